"""The seeded plan of a canary audit (``canary-gradients``, ``canary-inputs``): which canaries each simulated site
holds, where, and whether each is included in training. Read by the sites (to insert them) and by the auditor (to
score them); plain functions of the run configuration, the site's index and the model's shapes, no I/O.

The plan has its own seed (``canary-seed``) and its own random generators: it never draws from the generators that
sample the sites' batches, noise their gradients, augment their faces or initialise the models, so a run with canaries
computes exactly what the same run without them would, except for the canaries' own contributions (see
``client.canaries``).

- A **gradient canary** (white-box; Steinke et al. 2023's Dirac canary) is an example whose gradient is
  ``canary-norm * max-grad-norm`` times plus or minus one coordinate of the federated model (a coordinate no other
  site's canary uses). DP-SGD clips it like every example.
- An **input canary** (black-box) is a synthetic cartoon face (out of the distribution of real faces, drawn by
  ``common.data.synthetic`` from the plan's seed) labelled as a person of the site chosen at random: a mislabelled,
  out-of-distribution example, the kind a model memorises.
Each canary is included with probability 1/2 by its own coin; an included canary is Poisson-sampled at every step with
the site's sampling rate, as a real example is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.data.synthetic import make_synthetic_faces

_GRADIENT, _INPUT, _STEP = 1, 2, 3  # streams of the plan's generators


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**62)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class GradientCanaries:
    """One site's gradient canaries: canary i is ``sign[i] * norm`` on entry ``index[i]`` of the flattened parameter
    ``names[param[i]]`` (names as in the backbone's ``named_parameters``)."""

    names: tuple[str, ...]
    param: torch.Tensor  # [m] int64, into names
    index: torch.Tensor  # [m] int64, flat index within that parameter
    sign: torch.Tensor  # [m] float32, +1 or -1
    included: torch.Tensor  # [m] bool


@dataclass(frozen=True)
class InputCanaries:
    """One site's input canaries: uint8 faces [m, 3, S, S], each with the label (a person of the site) it is trained
    under."""

    images: torch.Tensor
    labels: torch.Tensor  # [m] int64
    included: torch.Tensor  # [m] bool


def trainable_shapes(backbone: torch.nn.Module) -> dict[str, torch.Size]:
    """The backbone's trainable parameters (what a site sends), by name, in ``named_parameters`` order."""
    return {name: p.shape for name, p in backbone.named_parameters() if p.requires_grad}


def canary_coordinates(shapes: dict[str, torch.Size], count: int, seed: int) -> torch.Tensor:
    """The first ``count`` coordinates (into the parameters of ``shapes`` flattened and concatenated in order) of the
    plan's seeded permutation: site k's gradient canaries sit at entries ``k * m`` to ``(k + 1) * m - 1``."""
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if count > total:
        raise ValueError(f"{count} gradient canaries do not fit into the model's {total} trainable coordinates; lower "
                         "canary-gradients.")
    return torch.randperm(total, generator=_generator(seed, _GRADIENT))[:count]


def gradient_canaries(shapes: dict[str, torch.Size], *, site_index: int, per_site: int, seed: int) -> GradientCanaries:
    """Site ``site_index``'s ``per_site`` gradient canaries. The coordinates of all sites come from one seeded
    permutation of the model's coordinates, site k taking the k-th block of it, so no two canaries share one."""
    names = tuple(shapes)
    sizes = torch.tensor([int(torch.Size(s).numel()) for s in shapes.values()])
    flat = canary_coordinates(shapes, (site_index + 1) * per_site, seed)[site_index * per_site :]
    own = _generator(seed, _GRADIENT, site_index)
    sign = torch.randint(0, 2, (per_site,), generator=own).float() * 2 - 1
    included = torch.rand(per_site, generator=own) < 0.5
    starts = torch.cumsum(sizes, 0) - sizes
    param = torch.searchsorted(torch.cumsum(sizes, 0), flat, right=True)
    return GradientCanaries(names, param, flat - starts[param], sign, included)


def input_canaries(*, site_index: int, per_site: int, num_identities: int, image_size: int,
                   seed: int) -> InputCanaries:
    """Site ``site_index``'s ``per_site`` input canaries: synthetic faces no site has, each labelled as one of the
    site's ``num_identities`` people at random."""
    if num_identities < 2:
        raise ValueError("Input canaries need a site with two or more people (a canary is labelled as a wrong one).")
    images = _synthetic_images(per_site, image_size, seed * 7919 + site_index)
    own = _generator(seed, _INPUT, site_index)
    labels = torch.randint(0, num_identities, (per_site,), generator=own)
    included = torch.rand(per_site, generator=own) < 0.5
    return InputCanaries(images, labels, included)


@functools.lru_cache(maxsize=8)
def _synthetic_images(count: int, image_size: int, seed: int) -> torch.Tensor:
    """``count`` synthetic faces, drawn at 64 px at most (drawing is slow) and resized to ``image_size``."""
    size = min(image_size, 64)
    images = make_synthetic_faces(max(1, (count + 1) // 2), 2, size, seed).images[:count]
    if size != image_size:
        images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return images


def step_generator(seed: int, site_index: int, server_round: int) -> torch.Generator:
    """The generator that Poisson-samples a site's canaries in one round (apart from its batch sampling and noise)."""
    return _generator(seed, _STEP, site_index, server_round)
