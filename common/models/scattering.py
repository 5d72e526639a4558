"""A scattering network for faces: a fixed wavelet front end (no learned weight, no data) and a small trained CNN.

Under DP-SGD the noise grows with the number of trained parameters while a site's signal does not, so a network
trained end to end from scratch on a site's few thousand faces learns little (0.60 View-1 accuracy for the compact
CNN, federated at epsilon 8). Tramer and Boneh ("Differentially Private Learning Needs Better Features (or Much More
Data)", ICLR 2021) showed that handcrafted features help most there: Mallat's scattering transform, a cascade of
wavelet filters and moduli fixed in advance, followed by a small CNN trained with DP-SGD, beat end-to-end CNNs at
every privacy budget they tried.

:class:`Scattering2d` is the order-2 scattering transform with Morlet wavelets (J scales, L orientations; the
wavelets of Kymatio, Andreux et al. 2020), computed with FFTs: on a grey-level face of side S it gives
1 + J L + L^2 J (J - 1) / 2 channels (81 for J = 2, L = 8) at side S / 2^J. It has no parameters and does not depend
on any data, so it is the model's frozen trunk: a site computes it once per face and its mirror image
(``client.train.cached_trunk_features``) and trains only :class:`ScatterHead`. Nothing pretrained is involved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.models.embedding import ConvLayer


def _gabor(size: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """A 2-D Gabor filter on a periodic ``size x size`` grid centred at the origin (complex128)."""
    coords = torch.fft.fftfreq(size, 1.0 / size, dtype=torch.float64)  # 0, 1, ..., -1: periodic around 0
    x, y = torch.meshgrid(coords, coords, indexing="ij")  # x runs down the rows, as in Kymatio
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    curvature = rotation @ torch.diag(torch.tensor([1.0, slant * slant], dtype=torch.float64)) @ rotation.T
    curvature = curvature / (2 * sigma * sigma)
    quadratic = curvature[0, 0] * x * x + (curvature[0, 1] + curvature[1, 0]) * x * y + curvature[1, 1] * y * y
    phase = xi * (x * c + y * s)
    return torch.exp(torch.complex(-quadratic, phase)) / (2 * math.pi * sigma * sigma / slant)


def _morlet(size: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """A Morlet wavelet: the Gabor filter minus its envelope, scaled so that it has zero mean."""
    wave, envelope = _gabor(size, sigma, theta, xi, slant), _gabor(size, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


class Scattering2d(nn.Module):
    """Order-2 scattering transform of ``[B, C, S, S]`` images: ``[B, C * K, S / 2^J, S / 2^J]`` with
    K = 1 + J L + L^2 J (J - 1) / 2 (per input channel: the low-passed image, J L first-order and the second-order
    paths with j2 > j1), each a local average (Gaussian of width 0.8 * 2^(J-1)) sampled every 2^J pixels.

    Wavelet j, orientation l: Morlet of width 0.8 * 2^j, frequency 3 pi / (4 * 2^j), slant 4 / L, angle
    (L/2 - 1 - l) pi / L, as in Kymatio. Images are padded by reflection (2^J * 4 pixels a side) before the
    periodic convolutions. The filters are non-persistent buffers: the module has no state to save or exchange.
    """

    def __init__(self, image_size: int, *, J: int = 2, L: int = 8) -> None:
        super().__init__()
        if J < 1 or L < 1 or image_size % (2**J):
            raise ValueError(f"Scattering needs J >= 1, L >= 1 and an image side divisible by 2^J; got J={J}, L={L}, "
                             f"side {image_size}.")
        self.image_size, self.J, self.L = image_size, J, L
        self.pad = min(4 * 2**J, image_size - 1)
        size = image_size + 2 * self.pad
        psi = [torch.fft.fft2(_morlet(size, 0.8 * 2**j, (L // 2 - 1 - l) * math.pi / L, 3 * math.pi / 4 / 2**j,
                                      4.0 / L)).real for j in range(J) for l in range(L)]
        phi = torch.fft.fft2(_gabor(size, 0.8 * 2 ** (J - 1), 0.0, 0.0, 1.0)).real
        self.register_buffer("psi", torch.stack(psi).float(), persistent=False)  # [J*L, M, M], Fourier domain
        self.register_buffer("phi", phi.float(), persistent=False)  # [M, M]

    @property
    def channels_per_input(self) -> int:
        return 1 + self.J * self.L + self.L * self.L * self.J * (self.J - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"Scattering2d was built for {self.image_size}x{self.image_size} images, got {h}x{w}.")
        p, step = self.pad, 2**self.J
        padded = F.pad(x.reshape(b * c, 1, h, w), (p, p, p, p), mode="reflect")[:, 0]  # [BC, M, M]

        def low(spectrum: torch.Tensor) -> torch.Tensor:  # local average, sampled every 2^J pixels
            return torch.fft.ifft2(spectrum * self.phi).real[..., p : p + h : step, p : p + w : step]

        spectrum = torch.fft.fft2(padded)  # [BC, M, M]
        first = torch.fft.ifft2(spectrum[:, None] * self.psi).abs()  # [BC, J*L, M, M]
        first_spectrum = torch.fft.fft2(first)
        out = [low(spectrum)[:, None], low(first_spectrum)]
        for j1 in range(self.J - 1):
            for j2 in range(j1 + 1, self.J):
                paths = first_spectrum[:, j1 * self.L : (j1 + 1) * self.L, None] * \
                    self.psi[None, None, j2 * self.L : (j2 + 1) * self.L]  # [BC, L, L, M, M]
                second = torch.fft.ifft2(paths).abs().flatten(1, 2)  # [BC, L*L, M, M]
                out.append(low(torch.fft.fft2(second)))
        return torch.cat(out, dim=1).reshape(b, c * self.channels_per_input, h // step, w // step)


class ScatterTrunk(nn.Module):
    """The frozen front end: [-1, 1] RGB faces -> scattering of their grey level ``[B, 81, S/4, S/4]``."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.scattering = Scattering2d(image_size)

    @property
    def out_channels(self) -> int:
        return self.scattering.channels_per_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scattering(x.add(1.0).mul(0.5).mean(dim=1, keepdim=True))


class ScatterHead(nn.Module):
    """The trained part: scattering features ``[B, K, S/4, S/4]`` -> unit-length embeddings ``[B, D]``.

    GroupNorm without affine (each sample's features normalised on their own, as Tramer and Boneh do), then three
    3x3 convolutions with GroupNorm and ReLU (``width``, ``2 width`` at stride 2, ``2 width`` at stride 2) and a
    Linear layer over the ``S/16 x S/16`` map (which keeps where on the face a feature lies)."""

    def __init__(self, channels: int, image_size: int, *, width: int = 16, embedding_dim: int = 128) -> None:
        super().__init__()
        groups = next(g for g in (9, 8, 4, 3, 2, 1) if channels % g == 0)
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.body = nn.Sequential(ConvLayer(channels, width), ConvLayer(width, 2 * width, stride=2),
                                  ConvLayer(2 * width, 2 * width, stride=2))
        side = image_size // 16
        self.projection = nn.Linear(2 * width * side * side, embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.body(self.norm(features)).flatten(1)), dim=1)


class ScatterNet(nn.Module):
    """Faces ``[B, 3, S, S]`` in [-1, 1] -> unit-length embeddings: :class:`ScatterTrunk` then :class:`ScatterHead`.
    S must be a multiple of 16. Its state (what is saved and federated) is the head's alone."""

    def __init__(self, embedding_dim: int = 128, *, image_size: int = 64, width: int = 16) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"model=scatternet needs an image size that is a multiple of 16, got {image_size}.")
        self.trunk = ScatterTrunk(image_size)
        self.head = ScatterHead(self.trunk.out_channels, image_size, width=width, embedding_dim=embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def split_frozen(self) -> tuple[nn.Module, nn.Module]:
        """(fixed trunk, trained head): ``head(trunk(x)) == self(x)``; the trunk has no parameters."""
        return self.trunk, self.head
