"""A procedurally drawn cartoon-face data set, so a federation can run with nothing downloaded.

Every identity gets fixed traits (face shape, skin tone, hair colour and hairline, eye spacing and
colour, eyebrows, nose, mouth, clothing, glasses, beard) and every image of it a fresh pose, lighting,
expression, background and sensor noise. Everything is drawn at once for the whole batch with soft
(anti-aliased) signed-distance masks, and all randomness comes from one seeded ``torch.Generator``,
so the same arguments give the same bytes whatever the global RNG state.

Coordinates: the image spans [-1, 1] on both axes, x to the right and y downwards. Shapes are
defined in a "face frame" that the pose (rotation, scale, shift) maps into the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from common.data.faceset import FaceSet

# Palettes, RGB in [0, 1].
_SKIN_LIGHT = (0.97, 0.82, 0.71)
_SKIN_DARK = (0.33, 0.20, 0.13)
_HAIR = (
    (0.07, 0.06, 0.06),  # black
    (0.25, 0.15, 0.08),  # dark brown
    (0.48, 0.30, 0.15),  # brown
    (0.86, 0.72, 0.42),  # blond
    (0.68, 0.27, 0.10),  # red
    (0.70, 0.70, 0.70),  # grey
)
_IRIS = (
    (0.20, 0.42, 0.75),  # blue
    (0.25, 0.55, 0.30),  # green
    (0.35, 0.20, 0.08),  # brown
    (0.55, 0.45, 0.20),  # hazel
    (0.50, 0.55, 0.60),  # grey
)

# Columns of the per-identity and per-image uniform draws (one row per identity / image).
_ID_TRAITS = (
    "face_w", "face_h", "jaw", "skin", "skin_warm", "hair_kind", "hair_jitter", "hairline", "hair_curve",
    "hair_part", "hair_volume", "hair_long", "bald", "ear", "eye_gap", "eye_y", "eye_w", "eye_h",
    "iris_kind", "iris_size", "brow_thick", "brow_tilt", "brow_arch", "brow_len", "nose_len", "nose_w",
    "mouth_w", "mouth_y", "lip_thick", "lip_red", "glasses", "glasses_tone", "beard", "beard_kind",
    "shirt_r", "shirt_g", "shirt_b",
)
_CHUNK_PIXELS = 1 << 15  # pixels drawn per batch of images
_IMG_VARS = (
    "rot", "tx", "ty", "scale", "yaw", "light_angle", "light_strength", "brightness", "contrast",
    "cast_r", "cast_g", "cast_b", "smile", "open_gate", "open", "eyes", "blink", "brow_raise",
    "gaze_x", "gaze_y", "bg_r", "bg_g", "bg_b", "bg_angle", "bg_strength", "noise",
)


def make_synthetic_faces(
    num_identities: int = 32,
    images_per_identity: int = 10,
    image_size: int = 64,
    seed: int = 0,
) -> FaceSet:
    """Draw a deterministic set of cartoon faces, ``images_per_identity`` per identity.

    Parameters
    ----------
    num_identities : int, default 32
        Number of distinct people K; labels are 0..K-1 and names ``synthetic_000`` ...
    images_per_identity : int, default 10
        Images per person (at least 2, so every identity can be split into train and test).
    image_size : int, default 64
        Side of the square images in pixels (16 to 512; tuned for 64 to 128).
    seed : int, default 0
        Seed of the private ``torch.Generator``; the global RNG is neither read nor advanced.

    Returns
    -------
    FaceSet
        uint8 images [K * images_per_identity, 3, S, S], grouped by identity, with paths like
        ``synthetic_003/0007`` and no skipped inputs.
    """
    for name, value in (("num_identities", num_identities), ("images_per_identity", images_per_identity),
                        ("image_size", image_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} should be an integer, got {value!r}.")
    if num_identities < 1:
        raise ValueError(f"num_identities should be at least 1, got {num_identities}.")
    if images_per_identity < 2:
        raise ValueError(
            f"images_per_identity should be at least 2 so each identity can be split, got {images_per_identity}."
        )
    if not 16 <= image_size <= 512:
        raise ValueError(f"image_size should be between 16 and 512 pixels, got {image_size}.")
    if seed < 0:
        raise ValueError(f"seed should be a non-negative integer, got {seed}.")

    with _single_thread():
        return _make(num_identities, images_per_identity, image_size, seed)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: the small per-chunk tensors gain little from more, and on a busy
    machine intra-op threads waiting for each other cost far more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make(num_identities: int, images_per_identity: int, image_size: int, seed: int) -> FaceSet:
    gen = torch.Generator().manual_seed(seed)
    # Identity traits come first, one row per identity, so they do not depend on images_per_identity.
    traits = torch.rand(num_identities, len(_ID_TRAITS), generator=gen)
    labels = torch.arange(num_identities).repeat_interleave(images_per_identity)
    n = labels.numel()
    per_image = torch.rand(n, len(_IMG_VARS), generator=gen)
    noise = torch.randn(n, 3, image_size, image_size, generator=gen)

    # Draw a few images at a time: the working tensors then stay in cache, which is many times faster.
    chunk = max(1, _CHUNK_PIXELS // (image_size * image_size))
    parts = []
    for lo in range(0, n, chunk):
        rows = slice(lo, min(lo + chunk, n))
        m = rows.stop - rows.start
        ident = {k: traits[labels[rows], i].view(m, 1, 1) for i, k in enumerate(_ID_TRAITS)}
        var = {k: per_image[rows, i].view(m, 1, 1) for i, k in enumerate(_IMG_VARS)}
        parts.append(_draw(ident, var, noise[rows], image_size))
    images = torch.cat(parts)

    identities = tuple(f"synthetic_{k:03d}" for k in range(num_identities))
    paths = tuple(f"{identities[k]}/{j:04d}" for k in range(num_identities) for j in range(images_per_identity))
    return FaceSet(images=images, labels=labels, identities=identities, paths=paths, skipped={})


# ---------------------------------------------------------------------------------------------------------------
# Drawing helpers. Tensors are [N, S, S] coordinates / masks and [N, 1, 1] parameters unless stated.


def _lerp(lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * u


def _rgb(colour: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(colour).view(1, 3, 1, 1)


def _palette(colours: tuple[tuple[float, float, float], ...], u: torch.Tensor) -> torch.Tensor:
    """Pick a palette entry per sample from a uniform draw u [N, 1, 1]; returns [N, 3, 1, 1]."""
    table = torch.tensor(colours)
    idx = (u.flatten() * len(colours)).long().clamp_max(len(colours) - 1)
    return table[idx].view(-1, 3, 1, 1)


def _ellipse(
    x: torch.Tensor, y: torch.Tensor, cx, cy, a, b, eps: torch.Tensor, angle: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft mask of the ellipse centred (cx, cy) with half-axes (a, b), optionally rotated by ``angle``."""
    dx, dy = x - cx, y - cy
    if angle is not None:
        c, s = torch.cos(angle), torch.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    u, v = dx / a, dy / b
    r = torch.sqrt(u * u + v * v + 1e-12)
    grad = torch.sqrt((u / a) ** 2 + (v / b) ** 2 + 1e-12) / r  # |grad r|, so (r - 1) / grad ~ distance
    return torch.sigmoid((1.0 - r) / (grad * eps))


def _band(y: torch.Tensor, lo, hi, eps: torch.Tensor) -> torch.Tensor:
    """Soft mask of lo < y < hi."""
    return torch.sigmoid((y - lo) / eps) * torch.sigmoid((hi - y) / eps)


def _paint(img: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Composite ``colour`` ([N, 3, 1, 1] or [N, 3, S, S]) over ``img`` with ``alpha`` [N, S, S]."""
    a = alpha.unsqueeze(1)
    return img + a * (colour - img)


def _draw(ident: dict[str, torch.Tensor], var: dict[str, torch.Tensor], noise: torch.Tensor, size: int) -> torch.Tensor:
    """Render one chunk: traits and variations [n, 1, 1] in [0, 1), noise [n, 3, S, S] -> uint8 [n, 3, S, S]."""
    n = noise.shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    gx, gy = gx.expand(n, size, size), gy.expand(n, size, size)

    # --- pose: image coordinates -> face frame --------------------------------------------------------------
    rot = _lerp(-12.0, 12.0, var["rot"]) * (math.pi / 180.0)
    scale = _lerp(0.92, 1.08, var["scale"])
    tx, ty = _lerp(-0.07, 0.07, var["tx"]), _lerp(-0.06, 0.06, var["ty"])
    c, s = torch.cos(rot), torch.sin(rot)
    px, py = gx - tx, gy - ty
    x = (c * px + s * py) / scale
    y = (-s * px + c * py) / scale
    eps = 0.45 * (2.0 / size) / scale  # softness: about half a pixel, in face-frame units

    # --- identity geometry ---------------------------------------------------------------------------------
    fw, fh = _lerp(0.50, 0.64, ident["face_w"]), _lerp(0.64, 0.78, ident["face_h"])
    fcy = torch.full_like(fw, -0.08)
    yaw = _lerp(-1.0, 1.0, var["yaw"]) * 0.10 * fw  # inner features slide sideways on a turned head
    fx = x - yaw  # coordinates of the inner features
    eye_gap, eye_y = _lerp(0.17, 0.27, ident["eye_gap"]), fcy + _lerp(-0.08, 0.02, ident["eye_y"])
    eye_w = _lerp(0.065, 0.11, ident["eye_w"])
    eye_h = eye_w * _lerp(0.40, 0.62, ident["eye_h"])
    nose_len, nose_w = _lerp(0.14, 0.26, ident["nose_len"]), _lerp(0.045, 0.09, ident["nose_w"])
    mouth_y = fcy + _lerp(0.34, 0.46, ident["mouth_y"]) * fh / 0.67
    mouth_w = _lerp(0.11, 0.21, ident["mouth_w"])

    # --- colours ---------------------------------------------------------------------------------------------
    skin_t = ident["skin"].view(n, 1, 1, 1)
    skin = _rgb(_SKIN_LIGHT) * (1 - skin_t) + _rgb(_SKIN_DARK) * skin_t
    warm = _lerp(-0.04, 0.04, ident["skin_warm"]).view(n, 1, 1, 1)
    skin = (skin + warm * _rgb((1.0, 0.0, -1.0))).clamp(0, 1)
    hair = _palette(_HAIR, ident["hair_kind"]) * _lerp(0.85, 1.15, ident["hair_jitter"]).view(n, 1, 1, 1)
    hair = hair.clamp(0, 1)
    iris = _palette(_IRIS, ident["iris_kind"])
    shirt = torch.stack([ident["shirt_r"], ident["shirt_g"], ident["shirt_b"]], 1) * 0.8 + 0.1
    lips = skin * 0.75 + _rgb((0.55, 0.15, 0.15)) * _lerp(0.1, 0.35, ident["lip_red"]).view(n, 1, 1, 1)
    dark = _rgb((0.05, 0.04, 0.04)).expand(n, 3, 1, 1)

    # --- background: a colour with a linear gradient ---------------------------------------------------------
    bg = torch.stack([var["bg_r"], var["bg_g"], var["bg_b"]], 1) * 0.5 + 0.25  # [N, 3, 1, 1]
    bga = var["bg_angle"] * 2 * math.pi
    ramp = (torch.cos(bga) * gx + torch.sin(bga) * gy) * _lerp(0.0, 0.15, var["bg_strength"])
    img = (bg + ramp.unsqueeze(1)).clamp(0, 1)

    # --- hair behind the head, neck, clothes, ears ---------------------------------------------------------
    has_hair = (ident["bald"] > 0.12).float()
    vol = _lerp(0.03, 0.12, ident["hair_volume"])
    long = (ident["hair_long"] > 0.55).float() * _lerp(0.0, 1.0, (ident["hair_long"] - 0.55) / 0.45)
    back = _ellipse(x, y, 0.0, fcy + long * 0.30, fw + vol + 0.04, fh * (0.95 + 0.55 * long) + vol, eps)
    img = _paint(img, back * has_hair * (long > 0).float(), hair * 0.85)
    neck = _band(x, -fw * 0.45, fw * 0.45, eps) * torch.sigmoid((y - fcy) / eps)
    img = _paint(img, neck, skin * 0.8)
    img = _paint(img, _ellipse(x, y, 0.0, fcy + fh + 0.62, 1.0, 0.45, eps), shirt)
    ear_a = _lerp(0.05, 0.08, ident["ear"])
    for side in (-1.0, 1.0):
        ex = side * fw * 0.97 - yaw * 0.5
        img = _paint(img, _ellipse(x, y, ex, eye_y + 0.06, ear_a, ear_a * 1.8, eps), skin * 0.88)

    # --- face oval, narrower towards a chin set by "jaw" -------------------------------------------------------
    jaw = _lerp(0.0, 0.30, ident["jaw"])
    below = ((y - fcy) / fh).clamp(0, 1)
    face = _ellipse(x / (1 - jaw * below * below), y, 0.0, fcy, fw, fh, eps)
    rr = (x / fw) ** 2 + ((y - fcy) / fh) ** 2
    shade = (1.0 - 0.22 * rr.clamp(0, 1.2)).unsqueeze(1)  # rounder look: darker at the rim
    img = _paint(img, face, skin * shade)

    # --- hair on top: inside a cap, above the hairline -------------------------------------------------------
    hx = x - yaw * 0.4
    line = fcy - fh * _lerp(0.38, 0.70, ident["hairline"]) + fh * _lerp(0.1, 0.7, ident["hair_curve"]) * (hx / fw) ** 2
    line = line + _lerp(-0.12, 0.12, ident["hair_part"]) * hx
    cap = _ellipse(x, y, 0.0, fcy - fh * 0.12, fw + vol, fh * 0.92 + vol, eps)
    img = _paint(img, cap * torch.sigmoid((line - y) / eps) * has_hair, hair)

    # --- eyebrows ------------------------------------------------------------------------------------------
    brow_t = _lerp(0.012, 0.032, ident["brow_thick"])
    brow_len = eye_w * _lerp(1.0, 1.5, ident["brow_len"])
    brow_y = eye_y - eye_h - _lerp(0.045, 0.08, ident["brow_arch"]) - _lerp(-0.01, 0.035, var["brow_raise"])
    tilt = _lerp(-0.30, 0.30, ident["brow_tilt"])
    brow_col = (hair * 0.8 + dark * 0.2) * has_hair.view(n, 1, 1, 1) + (skin * 0.55) * (1 - has_hair.view(n, 1, 1, 1))
    for side in (-1.0, 1.0):
        img = _paint(img, _ellipse(fx, y, side * eye_gap, brow_y, brow_len, brow_t, eps, angle=side * tilt), brow_col)

    # --- eyes: outline, white, iris, pupil -------------------------------------------------------------------
    blink = (var["blink"] < 0.1).float()
    openness = _lerp(0.55, 1.1, var["eyes"]) * (1 - blink) + 0.12 * blink
    eh = eye_h * openness
    gaze_x, gaze_y = _lerp(-0.3, 0.3, var["gaze_x"]) * eye_w, _lerp(-0.15, 0.15, var["gaze_y"]) * eye_h
    iris_r = eye_h * _lerp(0.75, 1.0, ident["iris_size"])
    white = _rgb((0.95, 0.95, 0.93))
    for side in (-1.0, 1.0):
        cx = side * eye_gap
        img = _paint(img, _ellipse(fx, y, cx, eye_y, eye_w + 0.012, eh + 0.012, eps), dark + skin * 0.3)
        sclera = _ellipse(fx, y, cx, eye_y, eye_w, eh, eps)
        img = _paint(img, sclera, white)
        img = _paint(img, sclera * _ellipse(fx, y, cx + gaze_x, eye_y + gaze_y, iris_r, iris_r, eps), iris)
        pupil = _ellipse(fx, y, cx + gaze_x, eye_y + gaze_y, iris_r * 0.45, iris_r * 0.45, eps)
        img = _paint(img, sclera * pupil, dark)

    # --- nose: bridge shadow, tip, nostrils -------------------------------------------------------------------
    tip_y = eye_y + nose_len
    bridge_shadow = _ellipse(fx, y, nose_w * 0.45, eye_y + nose_len * 0.55, nose_w * 0.28, nose_len * 0.5, eps)
    img = _paint(img, 0.35 * bridge_shadow, skin * 0.6)
    img = _paint(img, 0.45 * _ellipse(fx, y, 0.0, tip_y, nose_w, nose_w * 0.6, eps), skin * 0.78)
    for side in (-1.0, 1.0):
        nostril = _ellipse(fx, y, side * nose_w * 0.5, tip_y + nose_w * 0.3, nose_w * 0.3, nose_w * 0.17, eps)
        img = _paint(img, 0.8 * nostril, skin * 0.35)

    # --- beard and moustache (some identities) ---------------------------------------------------------------
    has_beard = (ident["beard"] < 0.22).float() * has_hair
    full = (ident["beard_kind"] > 0.5).float()  # full beard with sideburns, else a chin beard
    beard_top = mouth_y - 0.03 - full * 0.45 * (fx / fw) ** 4
    chin_only = full + (1 - full) * _ellipse(fx, y, 0.0, mouth_y + 0.12, mouth_w * 1.25, 0.17, eps)
    beard = face * torch.sigmoid((y - beard_top) / eps) * chin_only * has_beard
    img = _paint(img, 0.9 * beard, hair * 0.8)
    img = _paint(img, 0.9 * has_beard * _ellipse(fx, y, 0.0, mouth_y - 0.045, mouth_w * 1.15, 0.025, eps), hair * 0.7)

    # --- mouth: lips around a curve set by the expression, dark inside when open ---------------------------
    mx = fx / mouth_w
    smile = _lerp(-0.5, 1.0, var["smile"]) * 0.05
    gap = (var["open_gate"] > 0.7).float() * _lerp(0.0, 0.07, var["open"]) * (1 - mx * mx).clamp(min=0)
    curve = mouth_y - smile * mx * mx + smile * 0.5
    lip_t = _lerp(0.012, 0.03, ident["lip_thick"]) * (1 - 0.5 * mx * mx)
    across = torch.sigmoid((1 - mx.abs()) * mouth_w / eps)
    img = _paint(img, across * _band(y, curve - lip_t, curve + gap + lip_t * 1.2, eps), lips)
    img = _paint(img, across * _band(y, curve, curve + gap, eps), dark + 0.15 * lips)

    # --- glasses (some identities) --------------------------------------------------------------------------
    has_glasses = (ident["glasses"] < 0.25).float()
    frame = _rgb((0.08, 0.08, 0.10)) + _lerp(0.0, 0.5, ident["glasses_tone"]).view(n, 1, 1, 1) * _rgb((0.6, 0.2, 0.1))
    lens = torch.full((1, 3, 1, 1), 0.7)
    ga, gb, gt = eye_w * 1.6, eye_w * 1.25, 0.018  # lens half-axes and frame thickness
    for side in (-1.0, 1.0):
        cx = side * eye_gap
        ring = _ellipse(fx, y, cx, eye_y, ga + gt, gb + gt, eps) * (1 - _ellipse(fx, y, cx, eye_y, ga, gb, eps))
        img = _paint(img, 0.12 * has_glasses * _ellipse(fx, y, cx, eye_y, ga, gb, eps), lens)
        img = _paint(img, ring * has_glasses, frame)
    bar_y = eye_y - gb * 0.5
    bridge = _band(fx, -eye_gap + ga, eye_gap - ga, eps) * _band(y, bar_y - gt * 0.5, bar_y + gt * 0.5, eps)
    img = _paint(img, bridge * has_glasses, frame)

    # --- lighting, camera, noise -------------------------------------------------------------------------------
    la = var["light_angle"] * 2 * math.pi
    light = 1.0 + _lerp(0.0, 0.35, var["light_strength"]) * (torch.cos(la) * gx + torch.sin(la) * gy)
    img = img * light.unsqueeze(1)
    cast = torch.stack([var["cast_r"], var["cast_g"], var["cast_b"]], 1) * 0.10 + 0.95
    img = img * cast
    contrast = _lerp(0.80, 1.20, var["contrast"]).view(n, 1, 1, 1)
    brightness = _lerp(-0.10, 0.10, var["brightness"]).view(n, 1, 1, 1)
    img = (img - 0.5) * contrast + 0.5 + brightness
    img = img + noise * _lerp(0.004, 0.02, var["noise"]).view(n, 1, 1, 1)
    return (img.clamp(0, 1) * 255.0).round().to(torch.uint8)
