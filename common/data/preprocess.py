"""Turn photos into square face crops: a centre crop for aligned sets, MTCNN + 5-point alignment otherwise.

Pure functions of images (no file I/O): a PIL image goes in, a uint8 tensor ``[3, S, S]`` (or an
:class:`AlignResult`) comes out. Reading files, caching and skipping bad inputs live in
``common.data.datasets``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Fraction of the shorter side kept by ``center_crop_face``. LFW deep-funneled images are 250x250 with
# the face centred; 0.55 (a 137 px square) spans forehead to chin. Checked visually on random LFW images:
# 0.5 cuts chins, 0.6 adds neck and background.
LFW_CROP_FRACTION = 0.55

# ArcFace / InsightFace 5-point template for a 112x112 crop, in pixel-index coordinates:
# left eye, right eye, nose tip, left mouth corner, right mouth corner (left/right as seen in the image).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# "LFW crop" 5-point template: where MTCNN puts the landmarks of a face inside the LFW_CROP_FRACTION centre
# crop that LFW training faces are (see ``center_crop_face``), as fractions of the crop side in continuous
# coordinates (0 = left/top edge, 1 = right/bottom edge); same point order as ARCFACE_TEMPLATE_112. Aligning
# any photo to it frames the face like an LFW training crop, which is what a model trained on LFW expects.
# Measured once with FaceAligner(min_score=0.9).detect on one random image of each of 200 random LFW
# (deep-funneled) people (random.Random(0)): landmarks of the most confident face, mapped into the 0.55 crop,
# averaged; 5 images whose most confident face was a background face (a landmark > 0.15 crop sides from
# the median) were left out. Spread (std) over the 195: 0.017 for the eyes, 0.03 for nose and mouth.
LFW_CROP_TEMPLATE = np.array(
    [
        [0.3548, 0.4202],
        [0.6624, 0.4127],
        [0.5090, 0.5937],
        [0.3796, 0.7525],
        [0.6522, 0.7463],
    ],
    dtype=np.float64,
)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image.

    Grayscale is replicated to three channels, palette images are expanded, transparency is
    composited onto black, and 16-bit or float grayscale (e.g. 16-bit PGM) is rescaled to 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and float(arr.max()) > 255.0:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a uint8 tensor ``[3, H, W]`` (RGB)."""
    arr = np.array(to_rgb(img), dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer of at least 8 pixels, got {image_size!r}.")


def center_crop_face(img: Image.Image, image_size: int, crop_fraction: float = LFW_CROP_FRACTION) -> torch.Tensor:
    """Crop the central square of an already aligned face image and resize it.

    Parameters
    ----------
    img : PIL.Image.Image
        An aligned face photo (LFW deep-funneled, VGGFace2/CASIA crops); any mode.
    image_size : int
        Side ``S`` of the output in pixels.
    crop_fraction : float, default LFW_CROP_FRACTION (0.55)
        Side of the kept square as a fraction of the shorter image side, centred.

    Returns
    -------
    torch.Tensor
        uint8, shape ``[3, S, S]``, RGB.
    """
    _check_image_size(image_size)
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}.")
    img = to_rgb(img)
    w, h = img.size
    side = crop_fraction * min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    face = img.resize(
        (image_size, image_size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )
    return image_to_tensor(face)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama, 1991) that maps ``src`` points onto ``dst``.

    Parameters
    ----------
    src, dst : np.ndarray
        Corresponding points, shape ``[N, 2]`` with ``N >= 2``.

    Returns
    -------
    np.ndarray
        float64, shape ``[2, 3]``: ``dst ~= M[:, :2] @ src + M[:, 2]`` with ``M[:, :2]`` a scaled
        rotation (no reflection, no shear).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"src and dst must both be [N, 2] with N >= 2, got {src.shape} and {dst.shape}.")
    n = src.shape[0]
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = float((src_c**2).sum()) / n
    if var_src <= 1e-12:
        raise ValueError("src points all coincide; a similarity transform is undefined.")
    cov = dst_c.T @ src_c / n  # [2, 2]
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign)) / var_src
    translation = mu_dst - scale * rotation @ mu_src
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def arcface_template(image_size: int) -> np.ndarray:
    """The 5-point ArcFace template scaled to an ``image_size`` square, pixel-index coordinates, ``[5, 2]``."""
    _check_image_size(image_size)
    return (ARCFACE_TEMPLATE_112 + 0.5) * (image_size / 112.0) - 0.5


def lfw_crop_template(image_size: int) -> np.ndarray:
    """The 5-point "LFW crop" template (:data:`LFW_CROP_TEMPLATE`) for an ``image_size`` square, pixel-index
    coordinates, ``[5, 2]``: a face aligned to it is framed like ``center_crop_face`` frames an LFW photo."""
    _check_image_size(image_size)
    return LFW_CROP_TEMPLATE * image_size - 0.5


def align_to_template(
    img: Image.Image, landmarks: np.ndarray, image_size: int, template: np.ndarray | None = None
) -> torch.Tensor:
    """Warp ``img`` so that its 5 landmarks land on a 5-point template (similarity, bilinear).

    Parameters
    ----------
    img : PIL.Image.Image
        The full photo; any mode.
    landmarks : np.ndarray
        ``[5, 2]`` pixel coordinates ``(x, y)`` in ``img``: left eye, right eye, nose, left and right
        mouth corners (as MTCNN returns them).
    image_size : int
        Side ``S`` of the output.
    template : np.ndarray, optional
        ``[5, 2]`` target points in output pixel-index coordinates, same order as ``landmarks``
        (e.g. :func:`lfw_crop_template`). Default: the ArcFace template, :func:`arcface_template`.

    Returns
    -------
    torch.Tensor
        uint8, shape ``[3, S, S]``. Areas outside the photo are black.
    """
    img = to_rgb(img)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must have shape [5, 2], got {landmarks.shape}.")
    if template is None:
        template = arcface_template(image_size)
    template = np.asarray(template, dtype=np.float64)
    if template.shape != (5, 2):
        raise ValueError(f"template must have shape [5, 2], got {template.shape}.")
    # PIL samples at pixel centres (continuous coordinate = index + 0.5), so work in continuous coordinates.
    out_pts = template + 0.5
    in_pts = landmarks + 0.5
    inverse = estimate_similarity(out_pts, in_pts)  # output -> input, what PIL's AFFINE expects
    input_per_output = math.sqrt(abs(np.linalg.det(inverse[:, :2])))

    # Bilinear sampling aliases when shrinking by more than 2x: box-reduce the face region first.
    factor = int(input_per_output) if input_per_output >= 2.0 else 1
    if factor > 1:
        corners = np.array([[0, 0], [image_size, 0], [0, image_size], [image_size, image_size]], dtype=np.float64)
        mapped = corners @ inverse[:, :2].T + inverse[:, 2]
        w, h = img.size
        x0 = int(np.clip(math.floor(mapped[:, 0].min()) - factor, 0, w - 1))
        y0 = int(np.clip(math.floor(mapped[:, 1].min()) - factor, 0, h - 1))
        x1 = int(np.clip(math.ceil(mapped[:, 0].max()) + factor, x0 + 1, w))
        y1 = int(np.clip(math.ceil(mapped[:, 1].max()) + factor, y0 + 1, h))
        img = img.reduce(factor, box=(x0, y0, x1, y1))
        inverse = np.concatenate(
            [inverse[:, :2] / factor, ((inverse[:, 2] - np.array([x0, y0])) / factor)[:, None]], axis=1
        )
    face = img.transform(
        (image_size, image_size),
        Image.Transform.AFFINE,
        data=tuple(float(v) for v in inverse.reshape(-1)),
        resample=Image.Resampling.BILINEAR,
    )
    return image_to_tensor(face)


@dataclass(frozen=True)
class AlignResult:
    """Outcome of :meth:`FaceAligner.align`. "No face" is a value: ``found`` is False and arrays are zeros.

    Attributes
    ----------
    face : torch.Tensor
        uint8 ``[3, S, S]``, the aligned face; all zeros when ``found`` is False.
    found : bool
        Whether a face of at least the aligner's ``min_score`` was detected.
    score : float
        Detector confidence of the chosen face (0.0 when none).
    box : np.ndarray
        float32 ``[4]``, ``(x1, y1, x2, y2)`` of the chosen face in the input image (zeros when none).
    landmarks : np.ndarray
        float32 ``[5, 2]``, its 5 landmarks in the input image (zeros when none).
    num_faces : int
        Number of faces detected at or above ``min_score``.
    """

    face: torch.Tensor
    found: bool
    score: float
    box: np.ndarray
    landmarks: np.ndarray
    num_faces: int


class FaceAligner:
    """MTCNN face detection followed by 5-point similarity alignment to the ArcFace template.

    MTCNN's weights ship inside the facenet-pytorch wheel; nothing is downloaded.

    Parameters
    ----------
    image_size : int, default 112
        Side ``S`` of the aligned output.
    min_score : float, default 0.9
        Detections below this confidence are ignored.
    max_detect_side : int, default 1024
        Images whose longer side exceeds this are downscaled for detection (boxes and landmarks are
        mapped back, and the warp uses the full-resolution image).
    min_face_size : int, default 20
        Smallest face MTCNN looks for, in detection-image pixels.
    device : str, default "cpu"
        Torch device for MTCNN.
    """

    def __init__(
        self,
        image_size: int = 112,
        *,
        min_score: float = 0.9,
        max_detect_side: int = 1024,
        min_face_size: int = 20,
        device: str = "cpu",
    ) -> None:
        _check_image_size(image_size)
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score!r}.")
        if min_face_size < 12:
            raise ValueError(f"min_face_size must be at least 12 pixels (MTCNN's smallest window), got {min_face_size!r}.")
        if max_detect_side < 64:
            raise ValueError(f"max_detect_side must be at least 64 pixels, got {max_detect_side!r}.")
        from facenet_pytorch import MTCNN  # heavy import, only when detection is used

        self.image_size = image_size
        self.min_score = float(min_score)
        self.max_detect_side = int(max_detect_side)
        self.min_face_size = int(min_face_size)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, select_largest=False, device=device)

    def detect(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect faces at or above ``min_score``.

        Returns
        -------
        boxes : np.ndarray
            float32 ``[F, 4]`` ``(x1, y1, x2, y2)`` in ``img`` coordinates.
        scores : np.ndarray
            float32 ``[F]``.
        landmarks : np.ndarray
            float32 ``[F, 5, 2]``.
            ``F`` is 0 when no face is found (never None).
        """
        img = to_rgb(img)
        w, h = img.size
        scale = min(1.0, self.max_detect_side / max(w, h))
        small = img
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            scale_x, scale_y = size[0] / w, size[1] / h
        else:
            scale_x = scale_y = 1.0
        none = np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        if min(small.size) < self.min_face_size:  # too small to hold a face (and MTCNN fails on it)
            return none
        boxes, probs, points = self._mtcnn.detect(small, landmarks=True)
        if boxes is None or len(boxes) == 0:
            return none
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
        factor = np.array([scale_x, scale_y])
        boxes = boxes / np.tile(factor, 2)
        points = points / factor
        keep = probs >= self.min_score
        return boxes[keep].astype(np.float32), probs[keep].astype(np.float32), points[keep].astype(np.float32)

    def align(self, img: Image.Image, *, template: np.ndarray | None = None) -> AlignResult:
        """Detect faces, keep the largest confident one, and align it to a template (ArcFace by default).

        Parameters
        ----------
        img : PIL.Image.Image
            A photo in any mode.
        template : np.ndarray, optional
            ``[5, 2]`` target points for an ``image_size`` output (e.g. ``lfw_crop_template(image_size)``
            to frame the face like an LFW training crop); default the ArcFace template.

        Returns
        -------
        AlignResult
            ``found`` is False (and ``face`` all zeros) when no face reaches ``min_score``.
        """
        img = to_rgb(img)
        boxes, scores, points = self.detect(img)
        s = self.image_size
        if len(scores) == 0:
            return AlignResult(
                face=torch.zeros(3, s, s, dtype=torch.uint8),
                found=False,
                score=0.0,
                box=np.zeros(4, np.float32),
                landmarks=np.zeros((5, 2), np.float32),
                num_faces=0,
            )
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        best = int(np.lexsort((-scores, -areas))[0])  # largest face; ties broken by confidence
        return AlignResult(
            face=align_to_template(img, points[best], s, template),
            found=True,
            score=float(scores[best]),
            box=boxes[best],
            landmarks=points[best],
            num_faces=len(scores),
        )
