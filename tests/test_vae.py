"""Tests of the DP-compatible VAE / VAE-GAN in common/models/vae.py (real models and real Opacus, no mocks)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from common.models.vae import (ConvVAE, Discriminator, VAEConfig, interpolate, lsgan_discriminator_loss,
                               lsgan_generator_loss, vae_loss, vae_loss_terms)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),  # Opacus hooks, inputs need no grad
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

TINY = dict(latent_channels=2, base_channels=16)  # fast variants for gradient and training checks
TINY_LATENT = (2, 16, 16)  # its latent map at 64 px


def _blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth coloured Gaussian blobs on a grey background: [n, 3, size, size] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 1.0 - 0.5
    width = 0.2 + 0.3 * torch.rand(n, generator=g)
    colour = torch.rand(n, 3, generator=g)
    d2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2  # [n, S, S]
    blob = torch.exp(-d2 / (2 * width[:, None, None] ** 2))[:, None]  # [n, 1, S, S]
    return (0.5 * (1 - blob) + colour[:, :, None, None] * blob).clamp(0, 1)


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_range_and_size(size: int) -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(image_size=size)
    model = ConvVAE(cfg)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        recon, mu, logvar = model(x)
    assert recon.shape == x.shape
    assert mu.shape == logvar.shape == (2, 4, size // 4, size // 4) and cfg.latent_shape == (4, size // 4, size // 4)
    assert cfg.latent_size * 12 == 3 * size * size  # 12 times fewer numbers than the image
    assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    n_params = sum(p.numel() for p in model.parameters())
    assert {64: 200_000, 128: 50_000}[size] <= n_params <= {64: 400_000, 128: 100_000}[size], n_params
    samples = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (3, 3, size, size) and 0.0 <= float(samples.min()) <= float(samples.max()) <= 1.0
    scores = Discriminator(size)(x)
    assert scores.shape == (2,)


def test_logvar_is_clamped_and_inputs_checked() -> None:
    model = ConvVAE(VAEConfig(**TINY))
    with torch.no_grad():
        model.to_posterior.bias.fill_(1e4)
        _, logvar = model.encode(torch.rand(1, 3, 64, 64))
    assert float(logvar.max()) <= 10.0
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("size", [64, 128])
def test_opacus_validator_accepts_both_models(size: int) -> None:
    assert ModuleValidator.validate(ConvVAE(VAEConfig(image_size=size)), strict=True) == []
    assert ModuleValidator.validate(Discriminator(size), strict=True) == []
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in ConvVAE().modules())


def _per_sample_reference(model, batch_loss, n: int) -> list[dict[str, torch.Tensor]]:
    """Gradients of each sample's loss, computed one sample at a time on an unwrapped copy."""
    grads = []
    for i in range(n):
        model.zero_grad()
        batch_loss(model, i).backward()
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    return grads


def _check_grad_samples(wrapped: GradSampleModule, reference: list[dict[str, torch.Tensor]], n: int) -> None:
    for name, p in wrapped._module.named_parameters():
        assert p.grad_sample is not None, f"{name} has no grad_sample"
        assert p.grad_sample.shape == (n, *p.shape), (name, tuple(p.grad_sample.shape))
        for i in range(n):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], rtol=1e-7, atol=1e-10, msg=name)


def test_opacus_per_sample_gradients_match_one_at_a_time_vae() -> None:
    torch.manual_seed(0)
    n = 3
    model = ConvVAE(VAEConfig(**TINY)).double()
    reference_model = copy.deepcopy(model)
    x = _blobs(n, 64).double()
    eps = torch.randn(n, *TINY_LATENT, dtype=torch.float64)  # fixed reparameterisation noise

    wrapped = GradSampleModule(model, loss_reduction="mean")
    recon, mu, logvar = wrapped(x, eps=eps)
    vae_loss(recon, x, mu, logvar, reduction="mean").backward()

    def one(m, i):
        r, mu_i, lv_i = m(x[i : i + 1], eps=eps[i : i + 1])
        return vae_loss(r, x[i : i + 1], mu_i, lv_i)

    _check_grad_samples(wrapped, _per_sample_reference(reference_model, one, n), n)


def test_opacus_per_sample_gradients_match_one_at_a_time_discriminator() -> None:
    torch.manual_seed(0)
    n = 2
    disc = Discriminator(64, base_channels=8).double()
    reference_disc = copy.deepcopy(disc)
    real, fake = _blobs(n, 64, seed=1).double(), _blobs(n, 64, seed=2).double()

    wrapped = GradSampleModule(disc, loss_reduction="mean")
    # One forward over [real; fake]: every row is a sample of its own, 2n rows in grad_sample.
    scores = wrapped(torch.cat([real, fake]))
    rows = torch.cat([0.5 * (scores[:n] - 1).square(), 0.5 * scores[n:].square()])  # LSGAN terms per row
    rows.mean().backward()

    def one(m, j):
        s = m(torch.cat([real, fake])[j : j + 1])
        return 0.5 * (s - 1).square().sum() if j < n else 0.5 * s.square().sum()

    _check_grad_samples(wrapped, _per_sample_reference(reference_disc, one, 2 * n), 2 * n)


def test_privacy_engine_step_runs() -> None:
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(**TINY))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    loader = DataLoader(TensorDataset(_blobs(4, 64)), batch_size=2)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    (x,) = next(iter(loader))
    recon, mu, logvar = model(x)
    vae_loss(recon, x, mu, logvar).backward()
    for p in model.parameters():
        assert p.grad_sample.shape == (x.shape[0], *p.shape)
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.get_epsilon(delta=1e-5) > 0


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_morph_endpoints_and_mode(mode: str) -> None:
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(**TINY))
    model.train()
    a, b = _blobs(2, 64)
    frames = model.morph(a, b.unsqueeze(0), steps=5, mode=mode)
    assert frames.shape == (5, 3, 64, 64)
    assert model.training  # mode restored
    with torch.no_grad():
        mu = model.encode(torch.stack([a, b]))[0]
        ends = torch.cat([model.decode(mu[:1]), model.decode(mu[1:])])
    torch.testing.assert_close(frames[0], ends[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frames[-1], ends[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(frames[2], frames[0])
    model.eval()
    model.morph(a, b, steps=2, mode=mode)
    assert not model.training
    with pytest.raises(ValueError):
        model.morph(a, b, steps=1)
    with pytest.raises(ValueError):
        model.morph(_blobs(2, 64), b)


def test_interpolate_slerp_geometry() -> None:
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    za = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    zb = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    path = interpolate(za, zb, t, mode="slerp")
    torch.testing.assert_close(path.norm(dim=1), torch.full((7,), 3.0, dtype=torch.float64))  # stays on the sphere
    torch.testing.assert_close(path[3], 3.0 * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2))
    assert torch.equal(path[0], za) and torch.equal(path[-1], zb)
    # Nearly parallel and zero vectors fall back to a finite linear path.
    near = interpolate(za, 2 * za + 1e-9, t, mode="slerp")
    assert torch.isfinite(near).all()
    torch.testing.assert_close(near, interpolate(za, 2 * za + 1e-9, t, mode="linear"))
    assert torch.isfinite(interpolate(torch.zeros(3), zb.float(), t.float(), mode="slerp")).all()
    with pytest.raises(ValueError):
        interpolate(za, zb, t, mode="cubic")


def test_vae_loss_values_and_reduction() -> None:
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    mu, logvar = torch.zeros(2, 5), torch.zeros(2, 5)
    per = vae_loss(x_hat, x, mu, logvar, reduction="none")
    assert per.shape == (2,)
    torch.testing.assert_close(per, torch.full((2,), 0.5))  # KL of the prior itself is 0
    torch.testing.assert_close(vae_loss(x_hat, x, mu, logvar, recon="l2", reduction="none"), torch.full((2,), 0.25))
    mu = torch.tensor([[2.0, 0, 0, 0, 0], [0.0] * 5])
    rec, kl = vae_loss_terms(x_hat, x, mu, logvar)
    torch.testing.assert_close(kl, torch.tensor([2.0, 0.0]))  # 0.5 * mu^2
    per = vae_loss(x_hat, x, mu, logvar, beta=3.0, reduction="none")
    torch.testing.assert_close(per, torch.tensor([0.5 + 3.0 * 2.0 / 48, 0.5]))  # KL divided by 3*4*4 values
    torch.testing.assert_close(vae_loss(x_hat, x, mu, logvar, beta=3.0), per.mean())
    torch.testing.assert_close(vae_loss(x_hat, x, mu, logvar, beta=3.0, reduction="sum"), per.sum())
    with pytest.raises(ValueError):
        vae_loss(x_hat, x, mu, logvar, reduction="max")
    with pytest.raises(ValueError):
        vae_loss(x_hat, x, mu, logvar, recon="ssim")


def _loss(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    recon, mu, logvar = model(x, eps=eps)
    return vae_loss(recon, x, mu, logvar)


def test_a_few_adam_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(**TINY))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = _blobs(4, 64)
    eps = torch.randn(4, *TINY_LATENT)  # fixed noise: the loss is then a deterministic function
    with torch.no_grad():
        start = float(_loss(model, x, eps))
    for _ in range(60):
        optimizer.zero_grad()
        _loss(model, x, eps).backward()
        optimizer.step()
    with torch.no_grad():
        end = float(_loss(model, x, eps))
    assert end < 0.75 * start, (start, end)


def test_lsgan_losses_on_known_values() -> None:
    d_real = torch.tensor([1.0, 0.0, 2.0])
    d_fake = torch.tensor([0.0, 1.0, -1.0])
    per = lsgan_discriminator_loss(d_real, d_fake, reduction="none")
    torch.testing.assert_close(per, torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(lsgan_discriminator_loss(d_real, d_fake), per.mean())
    gen = lsgan_generator_loss(d_fake, reduction="none")
    torch.testing.assert_close(gen, torch.tensor([0.5, 0.0, 2.0]))
    torch.testing.assert_close(lsgan_generator_loss(d_fake, reduction="sum"), torch.tensor(2.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=100), "image size"),
        (dict(image_size=32), "image size"),
        (dict(latent_channels=0), "latent channel"),
        (dict(base_channels=8), "multiple of 16"),
        (dict(base_channels=24), "multiple of 16"),
        (dict(base_channels=0), "multiple of 16"),
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(recon="l3"), "reconstruction"),
    ],
)
def test_invalid_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**kwargs)


def test_invalid_discriminator_raises() -> None:
    with pytest.raises(ValueError, match="image size"):
        Discriminator(96)
    with pytest.raises(ValueError, match="multiple of 8"):
        Discriminator(64, base_channels=4)
