"""Pictures of a latent morph: frames to PIL images, upscaling, a one-row strip and an animated GIF.

Pure functions of images (tensors or PIL images in, PIL images or encoded bytes out). The only file I/O is
:func:`write_atomic`, which takes an explicit path. Reading photos, running the VAE and the egress gate live in
``server.morph``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.atomic import atomic_write_bytes

# GIF stores delays in 1/100 s, and browsers play delays under 20 ms at 100 ms: shorter frames would slow down.
MIN_FRAME_MS = 20
RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
NEUTRAL_GREY = (128, 128, 128)


def to_pil(frame: torch.Tensor) -> Image.Image:
    """One frame ``[3, S, S]`` (float in [0, 1], or uint8) as an RGB PIL image; floats are clamped and rounded."""
    if not isinstance(frame, torch.Tensor) or frame.ndim != 3 or frame.shape[0] != 3:
        shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
        raise ValueError(f"A frame must be a tensor [3, H, W]; got {shape}.")
    frame = frame.detach().cpu()
    if frame.dtype != torch.uint8:
        frame = (frame.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def upscale(img: Image.Image, size: int, *, resample: str = "lanczos") -> Image.Image:
    """Resize ``img`` to a ``size`` x ``size`` square with a sharp filter (``"lanczos"`` or ``"bicubic"``)."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}.")
    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLING)}, got {resample!r}.")
    img = img.convert("RGB")
    if img.size == (size, size):
        return img.copy()
    return img.resize((size, size), RESAMPLING[resample])


def placeholder(size: int, *, alpha: float, color: tuple[int, int, int] = NEUTRAL_GREY) -> Image.Image:
    """A neutral stand-in for a frame the egress gate withheld: flat grey (no face) with a thin bar along the
    bottom that shows how far through the morph (``alpha`` in [0, 1]) the frame was.

    The bar also keeps consecutive placeholders distinct, so a GIF encoder does not merge them into one frame.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    img = Image.new("RGB", (size, size), color)
    bar = max(1, size // 32)
    dark = tuple(max(0, c - 48) for c in color)
    ImageDraw.Draw(img).rectangle((0, size - bar, round(alpha * (size - 1)), size - 1), fill=dark)
    return img


def _check_frames(frames: Sequence[Image.Image]) -> tuple[int, int]:
    if not frames:
        raise ValueError("No frames given; a morph has at least 2.")
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"All frames must have the same size; got {sorted(sizes)}.")
    return frames[0].size


def strip(frames: Sequence[Image.Image], *, gap: int = 2, background: tuple[int, int, int] = (255, 255, 255)
          ) -> Image.Image:
    """The frames side by side in one row, ``gap`` pixels of ``background`` between them (none at the ends).

    Width is ``n * w + (n - 1) * gap`` for ``n`` frames of width ``w``.
    """
    if gap < 0:
        raise ValueError(f"gap must be >= 0 pixels, got {gap!r}.")
    w, h = _check_frames(frames)
    n = len(frames)
    out = Image.new("RGB", (n * w + (n - 1) * gap, h), background)
    for i, frame in enumerate(frames):
        out.paste(frame.convert("RGB"), (i * (w + gap), 0))
    return out


def loop_frames(frames: Sequence[Image.Image], *, pingpong: bool = True) -> list[Image.Image]:
    """The frames a GIF loop shows: with ``pingpong``, A..B followed by the inner frames reversed (B-1..A+1), so
    the loop returns to A smoothly without showing A or B twice in a row: ``2 n - 2`` frames for ``n >= 2``."""
    frames = list(frames)
    return frames + frames[-2:0:-1] if pingpong else frames


def gif_bytes(frames: Sequence[Image.Image], *, frame_ms: int = 120, pingpong: bool = True, loop: int = 0) -> bytes:
    """An animated GIF of ``frames`` (RGB, same size), every frame kept.

    One adaptive 256-colour palette is computed from all frames together and used for each without dithering,
    so colours do not flicker from frame to frame. ``pingpong`` appends the reversed inner frames (see
    :func:`loop_frames`); ``loop=0`` repeats forever. The encoder folds a frame identical to the one before it
    into that frame's duration, so the file's frame count is smaller only when the morph repeats itself.
    """
    _check_frames(frames)
    if not isinstance(frame_ms, int) or frame_ms < MIN_FRAME_MS:
        raise ValueError(f"frame_ms must be an integer of at least {MIN_FRAME_MS} ms (browsers play shorter GIF "
                         f"frames at 100 ms), got {frame_ms!r}.")
    if not isinstance(loop, int) or loop < 0:
        raise ValueError(f"loop must be a non-negative integer (0 = forever), got {loop!r}.")
    shown = loop_frames([f.convert("RGB") for f in frames], pingpong=pingpong)
    palette = strip(frames, gap=0).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indexed = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in shown]
    buffer = io.BytesIO()
    indexed[0].save(buffer, format="GIF", save_all=True, append_images=indexed[1:], duration=frame_ms, loop=loop,
                    disposal=1, optimize=False)
    return buffer.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG (no metadata)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def mse(a: Image.Image, b: Image.Image) -> float:
    """Mean squared difference of two same-sized images, in (0..255)^2 units."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"Images differ in size: {a.size} and {b.size}.")
    return float(((x - y) ** 2).mean())


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one); returns the path."""
    atomic_write_bytes(path, data)
    return Path(path)
