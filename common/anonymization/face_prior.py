"""The generic face the stylizer paints over a person's inner face: identity out, pose and landmarks kept.

Painterly texture alone leaves identity intact: a recognizer keys on the shape of the eyes, brows, nose and mouth,
which a style network trained to keep the face keeps. So before the face is stylized, its inner face (brows to
chin, cheek to cheek) is replaced by a *face prior*: the mean of many faces aligned by their 5 landmarks, an image
that looks like a face and like nobody. The prior is warped so that its 5 landmarks land exactly on the person's
(a similarity transform plus a smooth Gaussian radial-basis correction that is exact at the 5 points), its colours
are matched to the person's skin and lighting inside the mask, and it is blended in with a feathered ellipse.
Detectors still find a face with its landmarks where they were; the person's brows, eye shape, nose and mouth
are gone. (This is the k-Same family of de-identification, Newton et al. 2005, with k = all training faces,
followed by style transfer.)

Plain tensor functions and one small callable, no I/O: the prior is fitted by :func:`fit_face_prior` when a
stylizer is trained (``server.stylizers``) and travels inside the stylizer's weights
(``StyleNet.face_prior``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from common.data.preprocess import arcface_template, estimate_similarity

PRIOR_SIZE = 128  # side of the prior image; its 5 landmarks are the ArcFace template scaled to this side
# The inner-face ellipse in the prior's frame, as fractions of its side: centre (x, y) and half-axes (x, y). It
# covers brows, eyes, nose, mouth and chin and stops short of the hairline and the ears.
MASK_CENTRE = (0.5, 0.515)
MASK_AXES = (0.3125, 0.406)
MASK_FEATHER = 0.25  # falloff outside the ellipse, as a fraction of its radius
WARP_SIGMA = 0.16  # width of the radial-basis landmark correction, as a fraction of the prior's side


def prior_landmarks(size: int = PRIOR_SIZE) -> np.ndarray:
    """The prior's 5 landmarks ``[5, 2]`` (eyes, nose tip, mouth corners; pixel-index coordinates)."""
    return arcface_template(size)


def fit_face_prior(aligned: torch.Tensor) -> torch.Tensor:
    """The mean of faces aligned to :func:`prior_landmarks`: uint8 or float ``[N, 3, S, S]`` -> float ``[3, S, S]``
    in [0, 1]. Needs at least 50 faces: fewer leave a recognisable blend of a few people."""
    if aligned.ndim != 4 or aligned.shape[1] != 3 or aligned.shape[-1] != aligned.shape[-2]:
        raise ValueError(f"aligned faces should be [N, 3, S, S], got shape {tuple(aligned.shape)}.")
    if aligned.shape[0] < 50:
        raise ValueError(f"A face prior needs at least 50 aligned faces (a mean of few faces still shows them); "
                         f"got {aligned.shape[0]}.")
    x = aligned.float() / 255.0 if aligned.dtype == torch.uint8 else aligned.float()
    return x.mean(0).clamp(0.0, 1.0)


def _rbf_shift(points: np.ndarray, shifts: np.ndarray, u: torch.Tensor, v: torch.Tensor,
               sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth displacement field over ``(u, v)`` equal to ``shifts`` ``[5, 2]`` at ``points`` ``[5, 2]``
    (Gaussian radial basis functions of width ``sigma``; zero when the points coincide)."""
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    try:
        weights = np.linalg.solve(np.exp(-0.5 * (d / sigma) ** 2), shifts)  # [5, 2]
    except np.linalg.LinAlgError:
        return torch.zeros_like(u), torch.zeros_like(v)
    du, dv = torch.zeros_like(u), torch.zeros_like(v)
    for i in range(len(points)):
        phi = torch.exp(-0.5 * ((u - float(points[i, 0])) ** 2 + (v - float(points[i, 1])) ** 2) / sigma**2)
        du += float(weights[i, 0]) * phi
        dv += float(weights[i, 1]) * phi
    return du, dv


def calibrate_face_prior(prior: torch.Tensor, detect, *, iterations: int = 2) -> tuple[torch.Tensor, float]:
    """Move the prior's features so that a landmark detector finds them on :func:`prior_landmarks`.

    A mean face is soft, and a detector reads its landmarks a little off the points it was aligned on (MTCNN puts
    the mouth corners of a mean face about 3 px of 128 wider): painted on a person, the prior would then move their
    detected landmarks by that much. ``detect`` maps a float ``[3, H, W]`` image in [0, 1] to its face's 5
    landmarks ``[5, 2]`` (or None). Each iteration detects the landmarks on the prior (inside a replicate-padded
    frame) and warps the prior so that they move onto the template. Returns the prior and the remaining mean
    landmark error in pixels (NaN when nothing was detected)."""
    size = prior.shape[-1]
    target = prior_landmarks(size) + 0.5
    c = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    pad = size // 4
    error = float("nan")
    for step in range(iterations + 1):
        framed = F.pad(prior[None], (pad,) * 4, mode="replicate")[0]
        found = detect(framed)
        if found is None:
            return prior, float("nan")
        found = np.asarray(found, np.float64) - pad + 0.5
        error = float(np.linalg.norm(found - target, axis=1).mean())
        if step == iterations:
            break
        # Sample the prior at x + shift(x), with shift = found - target at the template points.
        du, dv = _rbf_shift(target, found - target, xs, ys, WARP_SIGMA * size)
        grid = torch.stack([(xs + du) / size * 2.0 - 1.0, (ys + dv) / size * 2.0 - 1.0], -1)[None]
        prior = F.grid_sample(prior[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    return prior.clamp(0.0, 1.0), error


@functools.lru_cache(maxsize=4)
def inner_face_mask(size: int, feather: float = MASK_FEATHER) -> torch.Tensor:
    """``[size, size]`` weights in [0, 1] in the prior's frame: 1 inside the inner-face ellipse, smooth falloff
    (computed once per size; do not modify the returned tensor)."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt(((xs / size - MASK_CENTRE[0]) / MASK_AXES[0]) ** 2
                   + ((ys / size - MASK_CENTRE[1]) / MASK_AXES[1]) ** 2)
    t = ((r - 1.0) / feather).clamp(0.0, 1.0)
    return 1.0 - t * t * (3.0 - 2.0 * t)


def _prior_coordinates(landmarks: np.ndarray, size: int, xs: torch.Tensor, ys: torch.Tensor,
                       sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous prior-frame coordinates ``(u, v)`` of image points ``(xs, ys)`` (continuous coordinates) such
    that the image's 5 ``landmarks`` map exactly onto the prior's: a similarity plus a Gaussian RBF correction."""
    target = prior_landmarks(size) + 0.5
    m = estimate_similarity(landmarks + 0.5, target)  # image -> prior, [2, 3]
    u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    mapped = (landmarks + 0.5) @ m[:, :2].T + m[:, 2]  # the landmarks in the prior's frame, [5, 2]
    du, dv = _rbf_shift(mapped, target - mapped, u, v, sigma)
    return u + du, v + dv


def paint_face_prior(image: torch.Tensor, landmarks: np.ndarray | torch.Tensor, prior: torch.Tensor, *,
                     amount: float = 1.0) -> torch.Tensor:
    """Replace the inner face of every face in ``image`` by ``prior``, warped onto its landmarks.

    Parameters
    ----------
    image : torch.Tensor
        float ``[3, H, W]`` in [0, 1] (not modified).
    landmarks : array
        ``[F, 5, 2]`` landmarks of the faces (image pixel coordinates, MTCNN's order: eyes, nose, mouth corners);
        F may be 0.
    prior : torch.Tensor
        float ``[3, S, S]`` in [0, 1] (:func:`fit_face_prior`).
    amount : float in [0, 1], default 1.0
        Blend weight of the prior inside the mask (1: the inner face is the prior's).

    Returns
    -------
    torch.Tensor
        float ``[3, H, W]`` in [0, 1].
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image should be float [3, H, W], got shape {tuple(image.shape)}.")
    if prior.ndim != 3 or prior.shape[0] != 3 or prior.shape[1] != prior.shape[2]:
        raise ValueError(f"prior should be float [3, S, S], got shape {tuple(prior.shape)}.")
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    size = prior.shape[-1]
    h, w = image.shape[-2:]
    out = image.clone()
    mask_full = inner_face_mask(size)[None]  # [1, S, S]
    both = torch.cat([prior.float(), mask_full], 0)[None]  # [1, 4, S, S]
    for lm in points:
        if not np.isfinite(lm).all():
            continue
        # The image region the prior's frame covers: its corners mapped back into the image.
        to_image = estimate_similarity(prior_landmarks(size) + 0.5, lm + 0.5)  # prior -> image, [2, 3]
        corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64) @ to_image[:, :2].T + to_image[:, 2]
        x0, y0 = max(0, math.floor(corners[:, 0].min()) - 1), max(0, math.floor(corners[:, 1].min()) - 1)
        x1, y1 = min(w, math.ceil(corners[:, 0].max()) + 1), min(h, math.ceil(corners[:, 1].max()) + 1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float32) + 0.5,
                                torch.arange(x0, x1, dtype=torch.float32) + 0.5, indexing="ij")
        u, v = _prior_coordinates(lm, size, xs, ys, WARP_SIGMA * size)
        grid = torch.stack([u / size * 2.0 - 1.0, v / size * 2.0 - 1.0], -1)[None]  # [1, h, w, 2]
        sampled = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        face, mask = sampled[:3], sampled[3] * float(amount)  # [3, h, w], [h, w]
        current = out[:, y0:y1, x0:x1]
        weight = mask / mask.sum().clamp_min(1e-6)
        if float(mask.sum()) < 1.0:
            continue
        # Match the prior's colours to the person's skin and light inside the mask (mean and spread per channel).
        mu_o = (current * weight).sum((1, 2), keepdim=True)
        sd_o = ((current - mu_o) ** 2 * weight).sum((1, 2), keepdim=True).sqrt()
        mu_p = (face * weight).sum((1, 2), keepdim=True)
        sd_p = ((face - mu_p) ** 2 * weight).sum((1, 2), keepdim=True).sqrt()
        face = ((face - mu_p) / sd_p.clamp_min(1e-3) * sd_o + mu_o).clamp(0.0, 1.0)
        out[:, y0:y1, x0:x1] = current + mask * (face - current)
    return out


class FacePrior:
    """``FacePrior(prior)(image, landmarks)``: :func:`paint_face_prior` with a fixed prior (for the anonymizer)."""

    def __init__(self, prior: torch.Tensor, amount: float = 1.0) -> None:
        if prior.ndim != 3 or prior.shape[0] != 3 or prior.shape[1] != prior.shape[2] or prior.shape[1] < 16:
            raise ValueError(f"A face prior is a float [3, S, S] image (S >= 16); got shape {tuple(prior.shape)}.")
        if not 0.0 <= amount <= 1.0:
            raise ValueError(f"amount must be in [0, 1], got {amount!r}.")
        self.prior = prior.detach().float().clamp(0.0, 1.0)
        self.amount = float(amount)

    def __call__(self, image: torch.Tensor, landmarks) -> torch.Tensor:
        return paint_face_prior(image, landmarks, self.prior, amount=self.amount)
