"""``facefl morph``: align two face photos, encode them with a run's VAE, interpolate in latent space, and write
the sequence as an animated GIF and a PNG strip, every frame anonymized through the egress gate by default.

Faces are framed the way the run's VAE saw its training faces (``aligned``: dlib's face chip, its central 80%).
dlib's pretrained face ResNet then judges the path: each frame's descriptor distance to each source face, whether
the end frames still match their sources, and the largest step between frames (``server.face_judge``). Outputs are
written atomically, and never over an input photo.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.config import RunConfig
from common.data.datasets import ALIGNED_CROP_FRACTION, DataError, tighter_resized
from common.data.dlib_chips import CHIP_PADDING, CHIP_SIZE, DlibChipper
from common.data.preprocess import FaceAligner, lfw_crop_template, to_rgb
from common.models.morphing import gif_bytes, loop_frames, placeholder, png_bytes, strip, to_pil, upscale, write_atomic
from server.rundir import RunDirError, load_run_config, load_run_models

log = logging.getLogger("facefl.morph")

MODES = ("linear", "slerp")
MIN_SIZE, MAX_SIZE = 16, 1024
# Decompression-bomb guard for the input photos (as ``facefl anonymize``).
MAX_PIXELS = 120_000_000
_ONE_FACE_HINT = "use a photo with one clearly visible face"


class MorphError(ValueError):
    """A morph that cannot be made or released; the message says why and what to do."""


@dataclass(frozen=True)
class MorphResult:
    """What :func:`morph_images` wrote.

    Attributes
    ----------
    gif, strip : Path
        The animated GIF and the PNG strip (``<stem>-strip.png`` beside the GIF).
    steps : int
        Frames from A to B.
    alphas : list of float
        Interpolation fraction of each frame, ``linspace(0, 1, steps)``.
    round : int
        Round of the checkpoint whose VAE made the frames.
    anonymized : bool
        Whether frames went through the egress gate.
    released : int
        Frames the gate released (``steps`` when not anonymized).
    withheld : int
        Frames the gate refused, shown as grey placeholders.
    gif_frames : int
        Frames in the GIF loop (``2 * steps - 2`` with ping-pong).
    seconds : float
        Wall time of the whole morph.
    to_a, to_b : list of float or None
        dlib descriptor distance of each frame to source face A and to B (None when dlib's weights are missing).
    ends_matched : bool or None
        Whether dlib matches the first frame to A and the last to B (distance below 0.6).
    max_step : float or None
        Largest descriptor distance between consecutive frames (smooth: at most ``server.face_judge.MORPH_MAX_STEP``).
    """

    gif: Path
    strip: Path
    steps: int
    alphas: list[float]
    round: int
    anonymized: bool
    released: int
    withheld: int
    gif_frames: int
    seconds: float
    to_a: list[float] | None = None
    to_b: list[float] | None = None
    ends_matched: bool | None = None
    max_step: float | None = None


def strip_path(out: str | Path) -> Path:
    """Where the strip of a morph written to ``out`` goes: ``<stem>-strip.png`` in the same folder."""
    out = Path(out)
    return out.with_name(f"{out.stem}-strip.png")


def check_request(image_a: str | Path, image_b: str | Path, *, out: str | Path, steps: int, mode: str = "linear",
                  size: int = 128, frame_ms: int = 120) -> tuple[Path, Path]:
    """Validate a morph's arguments before any work is done; returns ``(gif path, strip path)``.

    Raises
    ------
    MorphError
        When an output would overwrite an input photo, ``out`` is not a ``.gif`` file, or a number is out of
        range. Missing inputs are left to :func:`read_photo` (a ``FileNotFoundError``).
    """
    out = Path(out).expanduser()
    strip_out = strip_path(out)
    inputs = {Path(p).expanduser().resolve(): str(p) for p in (image_a, image_b)}
    for target in (out, strip_out):
        if target.resolve() in inputs:
            raise MorphError(f"--out {out} would overwrite the input {inputs[target.resolve()]} (as {target.name}); "
                             "choose another --out.")
    if out.suffix.lower() != ".gif":
        raise MorphError(f"--out must name a .gif file (the strip is written beside it as <stem>-strip.png); "
                         f"got {out}.")
    if out.is_dir():
        raise MorphError(f"--out {out} is a folder; give a file name such as {out / 'morph.gif'}.")
    if not isinstance(steps, int) or steps < 2:
        raise MorphError(f"--steps must be at least 2 (A and B); got {steps!r}. 11 gives alpha steps of 0.1.")
    if mode not in MODES:
        raise MorphError(f"--mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise MorphError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels; got {size!r}.")
    if not isinstance(frame_ms, int) or frame_ms < 20:
        raise MorphError(f"--frame-ms must be at least 20 ms (browsers play shorter GIF frames at 100 ms); "
                         f"got {frame_ms!r}.")
    return out, strip_out


def check_run(run_dir: str | Path) -> RunConfig:
    """The configuration of ``run_dir``; :class:`RunDirError` when it is not a run or holds no VAE."""
    cfg = load_run_config(run_dir)
    if not cfg.trains_vae:
        raise RunDirError(f"{run_dir} holds no VAE (it was trained with task {cfg.task!r}); morphing needs one: "
                          "train a run with `facefl simulate --task vae` (or --task both).")
    return cfg


def face_framing(cfg: RunConfig) -> str:
    """How the run's training faces were framed: ``cfg.face_mode`` (``"aligned"`` for every VAE run: the central
    120 of the 150 pixels of dlib's face chip, as ``common.data.datasets.load_faces`` cuts them)."""
    if not cfg.data:
        log.warning("This run was trained on the synthetic smoke-test faces; a morph of photos will not look like "
                    "them (train with --data for real faces).")
    return cfg.face_mode


@functools.lru_cache(maxsize=1)
def _chipper() -> DlibChipper:
    """dlib's chip cutter (HOG detector + 5-point landmarks), built once per process."""
    return DlibChipper(CHIP_SIZE, padding=CHIP_PADDING)


def read_photo(path: str | Path) -> Image.Image:
    """Open and decode one photo (EXIF orientation applied) as RGB; a clear error naming the file otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a face photo.")
    if not path.is_file():
        raise DataError(f"{path} is not a file; pass the path of a face photo.")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{path} is too large ({img.width}x{img.height} pixels, limit {MAX_PIXELS:,}); "
                                "downscale it first.")
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except DataError:
        raise
    # PIL raises many exception types on corrupt data (OSError, SyntaxError, ValueError, struct.error, ...).
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a readable image ({first}); pass a JPEG or PNG photo.") from None


def prepare_face(path_or_image: str | Path | Image.Image, *, cfg: RunConfig, aligner: FaceAligner | None = None,
                 framing: str | None = None) -> torch.Tensor:
    """Detect the largest face in a photo and frame it as the run's VAE was trained: float ``[3, S, S]`` in [0, 1].

    Parameters
    ----------
    path_or_image : path or PIL.Image.Image
        The photo (read with :func:`read_photo` when a path).
    cfg : RunConfig
        The run's configuration: ``image_size`` is ``S``, ``data`` decides the framing (:func:`face_framing`).
    aligner : FaceAligner, optional
        MTCNN aligner with ``image_size == cfg.image_size`` (built when needed: ``crop`` and ``detect`` framing).
    framing : {"aligned", "crop", "detect"}, optional
        Override of :func:`face_framing` (computed from ``cfg`` when None). ``"aligned"`` cuts dlib's face chip
        (HOG detector and 5-point landmarks) and keeps its central 80%; ``"crop"`` and ``"detect"`` align with MTCNN
        to the LFW-crop or ArcFace template.

    Raises
    ------
    DataError
        When the file is unreadable or no face is found (the message names the file).
    """
    if aligner is not None and aligner.image_size != cfg.image_size:
        raise ValueError(f"The aligner makes {aligner.image_size}-pixel faces but the run's VAE takes "
                         f"{cfg.image_size}; build FaceAligner({cfg.image_size}).")
    if isinstance(path_or_image, Image.Image):
        name, img = "the image", to_rgb(path_or_image)
    else:
        name, img = str(path_or_image), read_photo(path_or_image)
    framing = framing or face_framing(cfg)
    if framing not in ("aligned", "crop", "detect"):
        raise ValueError(f'framing must be "aligned", "crop" or "detect", got {framing!r}.')
    if framing == "aligned":
        chip = _chipper().chip(img)
        if not chip.found:
            raise DataError(f"no face found in {name}; {_ONE_FACE_HINT}.")
        if chip.num_faces > 1:
            log.warning("%d faces in %s; morphing the largest.", chip.num_faces, name)
        return tighter_resized(chip.face[None], ALIGNED_CROP_FRACTION, cfg.image_size)[0].float() / 255.0
    template = lfw_crop_template(cfg.image_size) if framing == "crop" else None
    aligner = aligner or FaceAligner(cfg.image_size)
    try:
        result = aligner.align(img, template=template)
    except (RuntimeError, ValueError, IndexError) as exc:  # MTCNN on a degenerate image
        raise DataError(f"no face found in {name} ({exc}); {_ONE_FACE_HINT}.") from None
    if not result.found:
        raise DataError(f"no face found in {name}; {_ONE_FACE_HINT}.")
    if result.num_faces > 1:
        log.warning("%d faces in %s; morphing the largest.", result.num_faces, name)
    return result.face.float() / 255.0


def morph_images(image_a: str | Path, image_b: str | Path, *, run_dir: str | Path, steps: int = 11,
                 mode: str = "linear", out: str | Path = "morph.gif", gate=None, size: int = 128,
                 frame_ms: int = 120, pingpong: bool = True, aligner: FaceAligner | None = None) -> MorphResult:
    """Morph the face in ``image_a`` into the face in ``image_b`` with the VAE of ``run_dir``'s latest checkpoint.

    Parameters
    ----------
    image_a, image_b : path
        Photos with one clearly visible face each; never modified.
    run_dir : path
        A run directory trained with task ``vae`` or ``both``.
    steps : int, default 11
        Frames from A to B (>= 2), at ``alpha = linspace(0, 1, steps)``; 11 gives steps of 0.1.
    mode : {"linear", "slerp"}, default "linear"
        Latent interpolation (see ``common.models.vae.interpolate``).
    out : path, default "morph.gif"
        The GIF; the strip goes beside it as ``<stem>-strip.png``.
    gate : common.anonymization.egress.EgressGate, optional
        Every frame (upscaled to ``size``) is released through it with purpose ``"morph"``; a withheld frame is
        replaced by a grey placeholder (:func:`common.models.morphing.placeholder`). None writes the VAE's frames as
        they are: recognisable faces of the two people may remain, so only an explicit opt-out should pass None.
    size : int, default 128
        Side of each output frame in pixels (the VAE's frames are upscaled with Lanczos).
    frame_ms : int, default 120
        Duration of each GIF frame.
    pingpong : bool, default True
        Loop A -> B -> A (see :func:`common.models.morphing.loop_frames`).
    aligner : FaceAligner, optional
        Reused when given (``image_size`` must be the run's); built otherwise.

    Raises
    ------
    MorphError, RunDirError, DataError, FileNotFoundError
        Bad arguments, a folder that is not a run or has no VAE, an unreadable photo or one without a face, or
        every frame withheld by the gate. Nothing is written then.
    """
    start = time.perf_counter()
    gif_path, strip_out = check_request(image_a, image_b, out=out, steps=steps, mode=mode, size=size,
                                        frame_ms=frame_ms)
    check_run(run_dir)
    for path in (image_a, image_b):
        read_photo(path)  # unreadable inputs fail before the models load
    cfg, models, ckpt_round = load_run_models(run_dir)
    if models.vae is None:  # check_run saw the config; this guards a checkpoint that lost its VAE
        raise RunDirError(f"{run_dir} holds no VAE; train a run with `facefl simulate --task vae` (or --task both).")
    framing = face_framing(cfg)
    a = prepare_face(image_a, cfg=cfg, aligner=aligner, framing=framing)
    b = prepare_face(image_b, cfg=cfg, aligner=aligner, framing=framing)
    with torch.inference_mode():
        decoded = models.vae.morph(a, b, steps=steps, mode=mode)  # [steps, 3, S, S] in [0, 1]
    alphas = [float(t) for t in torch.linspace(0.0, 1.0, steps)]
    path = judge_morph(decoded, a, b, cfg) if framing == "aligned" else None
    frames = [upscale(to_pil(f), size) for f in decoded]

    released, withheld = len(frames), 0
    if gate is not None:
        frames, released, withheld = release_frames(frames, alphas, gate)

    write_atomic(gif_path, gif_bytes(frames, frame_ms=frame_ms, pingpong=pingpong))
    write_atomic(strip_out, png_bytes(strip(frames)))
    return MorphResult(gif=gif_path, strip=strip_out, steps=steps, alphas=alphas, round=ckpt_round,
                       anonymized=gate is not None, released=released, withheld=withheld,
                       gif_frames=len(loop_frames(frames, pingpong=pingpong)),
                       seconds=time.perf_counter() - start,
                       **({"to_a": path["to_a"], "to_b": path["to_b"], "ends_matched": path["ends-matched"] == 1.0,
                           "max_step": path["max-step"]} if path else {}))


def judge_morph(frames: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: RunConfig) -> dict | None:
    """dlib's verdict on a morph of ``aligned`` faces (frames [T, 3, S, S], sources [3, S, S], floats in [0, 1]):
    :func:`server.face_judge.morph_metrics`, or None when dlib's weights are missing."""
    from common.weights import default_cache_dir
    from server.face_judge import load_face_judge, morph_metrics

    judge = load_face_judge(cfg.cache_dir or default_cache_dir())
    if judge is None:
        return None
    ends = judge.describe(torch.stack([a, b]))
    return morph_metrics(judge.describe(frames)[None], ends[:1], ends[1:])


def release_frames(frames: list[Image.Image], alphas: list[float], gate) -> tuple[list[Image.Image], int, int]:
    """Release each frame through ``gate`` (an :class:`common.anonymization.egress.EgressGate`) with purpose
    ``"morph"``.

    Returns ``(frames, released, withheld)``: released frames are the gate's pixels, withheld ones grey
    placeholders marked with their ``alpha`` (:func:`common.models.morphing.placeholder`). Raises :class:`MorphError`
    when the gate withholds every frame.
    """
    if len(frames) != len(alphas):
        raise ValueError(f"{len(frames)} frames but {len(alphas)} alphas; give one alpha per frame.")
    from common.anonymization.egress import EgressRefused

    out: list[Image.Image] = []
    reasons: list[str] = []
    for frame, alpha in zip(frames, alphas):
        try:
            pixels = gate.release(frame, purpose="morph").pixels
        except EgressRefused as exc:
            reasons.append(str(exc).rstrip("."))
            out.append(placeholder(frame.width, alpha=alpha))
            continue
        img = Image.fromarray(pixels, mode="RGB")
        out.append(img if img.size == frame.size else upscale(img, frame.width))
    withheld = len(reasons)
    if withheld == len(frames):
        raise MorphError(f"The egress gate withheld all {withheld} frames ({reasons[0]}); nothing was written. "
                         "Try --strength 1.0, another --style or --stylizer, or --method pixelate.")
    if withheld:
        log.warning("The egress gate withheld %d of %d frames; they are grey placeholders.", withheld, len(frames))
    return out, len(frames) - withheld, withheld
