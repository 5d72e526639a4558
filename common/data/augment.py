"""Training-time augmentation of aligned face crops, vectorised over the batch.

Every sample gets its own horizontal flip, small rotation, shift, brightness and contrast jitter; all
random numbers come from the given ``torch.Generator``, so a seeded generator gives the same batch twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the face augmentations; ``augment_faces(x, gen, **asdict(cfg))`` applies them.

    Attributes
    ----------
    flip_p : float, default 0.5
        Probability of mirroring a sample left-right (faces are near-symmetric, so identity is kept).
    max_rotation_deg : float, default 8.0
        Rotations are drawn uniformly from [-max_rotation_deg, max_rotation_deg] degrees.
    max_shift : float, default 0.06
        Shifts are drawn uniformly from [-max_shift, max_shift] of the image size, on each axis.
    brightness : float, default 0.2
        An offset drawn uniformly from [-brightness, brightness] is added to every pixel.
    contrast : float, default 0.2
        Pixels are scaled about the image mean by a factor drawn from [1 - contrast, 1 + contrast].
    """

    flip_p: float = 0.5
    max_rotation_deg: float = 8.0
    max_shift: float = 0.06
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p is a probability and should be in [0, 1], got {self.flip_p}.")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg should be in [0, 180] degrees, got {self.max_rotation_deg}.")
        if not 0.0 <= self.max_shift <= 0.5:
            raise ValueError(
                f"max_shift is a fraction of the image size and should be in [0, 0.5], got {self.max_shift}."
            )
        if not 0.0 <= self.brightness <= 1.0:
            raise ValueError(f"brightness should be in [0, 1], got {self.brightness}.")
        if not 0.0 <= self.contrast <= 1.0:
            raise ValueError(
                f"contrast should be in [0, 1] so the contrast factor stays non-negative, got {self.contrast}."
            )

    @property
    def is_identity(self) -> bool:
        """True when every strength is zero, so augmentation returns its input unchanged."""
        return not (self.flip_p or self.max_rotation_deg or self.max_shift or self.brightness or self.contrast)


def augment_faces(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    flip_p: float = 0.5,
    max_rotation_deg: float = 8.0,
    max_shift: float = 0.06,
    brightness: float = 0.2,
    contrast: float = 0.2,
) -> torch.Tensor:
    """Randomly flip, rotate, shift and colour-jitter each image of a batch.

    Parameters
    ----------
    x : torch.Tensor
        Float images [B, C, H, W] in [0, 1]; not modified.
    generator : torch.Generator or None, default None
        Source of all random draws (a CPU generator; the draws are moved to ``x.device``).
        ``None`` uses torch's global RNG.
    flip_p, max_rotation_deg, max_shift, brightness, contrast
        Strengths, as documented on :class:`AugmentConfig`.

    Returns
    -------
    torch.Tensor
        A new tensor shaped and typed like ``x``, clamped to [0, 1]. Rotation and shift resample with
        bilinear interpolation, repeating the border pixels.
    """
    cfg = AugmentConfig(flip_p, max_rotation_deg, max_shift, brightness, contrast)
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augment_faces expects float images [B, C, H, W], got {x.dtype} {tuple(x.shape)}.")
    b = x.shape[0]
    if b == 0 or cfg.is_identity:
        return x.clamp(0.0, 1.0)

    # One row of draws per sample, always the same columns, so results depend only on the generator.
    u = torch.rand(b, 6, generator=generator, device=generator.device if generator is not None else "cpu")
    u = u.to(device=x.device, dtype=x.dtype)
    flip = torch.where(u[:, 0] < cfg.flip_p, -1.0, 1.0).to(x.dtype)
    angle = (2 * u[:, 1] - 1) * math.radians(cfg.max_rotation_deg)
    shift = (2 * u[:, 2:4] - 1) * (2 * cfg.max_shift)  # affine_grid's coordinates span 2 per image side
    offset = (2 * u[:, 4] - 1) * cfg.brightness
    gain = 1 + (2 * u[:, 5] - 1) * cfg.contrast

    out = x
    if cfg.flip_p or cfg.max_rotation_deg or cfg.max_shift:
        # Output pixel p samples input R(angle) @ diag(flip, 1) @ p + shift.
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
        )  # [B, 2, 3]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.brightness or cfg.contrast:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * gain.view(b, 1, 1, 1) + mean + offset.view(b, 1, 1, 1)
    return out.clamp(0.0, 1.0)
