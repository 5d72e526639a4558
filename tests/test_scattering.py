"""The scattering network (model=scatternet) on real LFW faces: a fixed wavelet front end that has no state, is
stable to small shifts where pixels are not, runs once per face at a site, and a head that DP-SGD trains."""

from __future__ import annotations

import math

import pytest
import torch

from client.train import DPSettings, split_frozen, train_embedding
from common.config import RunConfig
from common.data.datasets import load_faces
from common.models.federated import build_models
from common.models.losses import MarginHead
from common.models.scattering import Scattering2d

PEOPLE = ["Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody", "Al_Gore", "Alejandro_Toledo", "Ali_Naimi"]


@pytest.fixture(scope="module")
def faces(lfw_root, cache_dir):
    return load_faces(lfw_root, image_size=64, mode="aligned", identities=PEOPLE, min_images=2, cache_dir=cache_dir,
                      progress=False)


def test_wavelets_are_band_pass_and_the_average_is_kept(faces):
    scattering = Scattering2d(64)
    assert scattering.psi[:, 0, 0].abs().max() < 1e-5  # every Morlet wavelet has zero mean
    assert abs(float(scattering.phi[0, 0]) - 1.0) < 1e-3  # the low-pass filter averages
    x = faces.images[:4].float().div(255.0).mean(dim=1, keepdim=True)  # [4, 1, 64, 64]
    out = scattering(x)
    assert out.shape == (4, 81, 16, 16) and torch.isfinite(out).all() and (out[:, 1:] >= 0).all()
    torch.testing.assert_close(out[:, 0].mean(dim=(1, 2)), x.mean(dim=(1, 2, 3)), atol=0.01, rtol=0.0)


def test_each_first_order_wavelet_picks_its_own_orientation():
    """A grating at wavelet l's frequency and angle excites first-order channel l of the finest scale most."""
    scattering = Scattering2d(64)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for l in range(scattering.L):
        theta = (scattering.L // 2 - 1 - l) * math.pi / scattering.L
        grating = 0.5 + 0.5 * torch.cos(3 * math.pi / 4 * (rows * math.cos(theta) + cols * math.sin(theta)))
        energy = scattering(grating[None, None])[0, 1 : 1 + scattering.L].mean(dim=(1, 2))  # j = 0, each angle
        assert int(energy.argmax()) == l, energy


def test_the_model_is_its_head_and_the_trunk_is_fixed(faces):
    models = build_models(RunConfig.from_mapping({"model": "scatternet", "task": "embedding"}))
    net = models.embedding
    assert all(k.startswith("embedding.head.") for k in models.state_dict())  # only the head is saved and federated
    trunk, head = split_frozen(net)
    assert not list(trunk.parameters()) and not trunk.state_dict()
    x = faces.images[:4].float().div(255.0).mul(2).sub(1)
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), net(x))
    with pytest.raises(ValueError, match="multiple of 16"):
        build_models(RunConfig.from_mapping({"model": "scatternet", "task": "embedding", "image-size": 72}))


def test_dp_training_trains_the_head_on_cached_scattering(faces, tmp_path):
    models = build_models(RunConfig.from_mapping({"model": "scatternet", "task": "embedding"}))
    net = models.embedding
    before = {k: v.clone() for k, v in net.state_dict().items()}
    head = MarginHead(128, faces.num_identities)
    first = train_embedding(net, head, faces, epochs=1, batch_size=16, lr=2e-3, optimizer="adamw",
                            dp=DPSettings(0.5, 1.0), feature_cache=tmp_path)
    assert sorted(tmp_path.glob("trunk-*/*.pt"))  # the scattering of each face is computed once and kept
    res = train_embedding(net, head, faces, epochs=8, batch_size=16, lr=2e-3, optimizer="adamw",
                          dp=DPSettings(0.5, 1.0), feature_cache=tmp_path, optimizer_state=first.optimizer_state)
    ((sigma, _, steps),) = res.mechanisms
    assert sigma == 0.5 and steps == res.metrics["steps"]
    assert all(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert res.metrics["train-loss"] < first.metrics["train-loss"]
