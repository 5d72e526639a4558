"""Anonymize the faces in a photo: detect every face, replace its region with a stylized version, blend it back.

A pure function of images (no file I/O): a PIL image goes in, an :class:`AnonymizationResult` comes out. "No
face found" is a value of that result, never None, and the default policy fails closed: when no face is found
the whole image is stylized (or, by option, refused), so a face the detector missed never leaves untouched.

What replaces a face is a :class:`RegionFilter`: the fast feed-forward stylizer (:class:`StyleFilter`), Gatys
optimisation (:class:`GatysFilter`), or the trivial baselines (:class:`BlurFilter`, :class:`PixelateFilter`)
that the benchmark compares against. ``strength`` blends the filtered region with the original inside the face
mask (1.0: fully filtered), trading privacy against fidelity.

Re-identification is scored when a recognizer is given (anything with ``describe(image, box)``,
``distance(a, b)`` and ``THRESHOLD``, such as ``common.anonymization.recognizer.DlibRecognizer``): for every face, the
distance between the descriptors of the original and the anonymized face at the same box. The anonymization is
an empirical protection; these scores are how it is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from common.data.preprocess import image_to_tensor, to_rgb

NO_FACE_POLICIES = ("whole", "refuse", "pass")


class RegionFilter(Protocol):
    """Replaces the pixels of one image region: float ``[3, h, w]`` in [0, 1] in, same shape out."""

    name: str

    def __call__(self, region: torch.Tensor) -> torch.Tensor: ...


class Recognizer(Protocol):
    THRESHOLD: float
    name: str

    def describe(self, image: np.ndarray, box) -> np.ndarray | None: ...

    def distance(self, a: np.ndarray, b: np.ndarray) -> float: ...


@dataclass(frozen=True)
class FaceRecord:
    """One detected face. ``box`` is ``(x1, y1, x2, y2)`` in input-image pixels, ``landmarks`` ``[5, 2]`` (eyes,
    nose, mouth corners). ``reid_distance`` is the recognizer's distance between the original and the anonymized
    face (None when no recognizer was given or it could not describe the face); ``matched`` says whether that
    distance is still below the recognizer's same-person threshold."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    reid_distance: float | None = None
    matched: bool | None = None
    descriptor: np.ndarray | None = field(default=None, repr=False, compare=False)  # the anonymized face's, if scored
    source_descriptor: np.ndarray | None = field(default=None, repr=False, compare=False)  # the original face's

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.box], "score": round(float(self.score), 4),
                "reid_distance": None if self.reid_distance is None else round(float(self.reid_distance), 4),
                "matched": self.matched}


@dataclass(frozen=True)
class AnonymizationResult:
    """Outcome of :meth:`Anonymizer.__call__`.

    Attributes
    ----------
    image : PIL.Image.Image or None
        The anonymized image, same size and mode family (RGB, or L for grayscale input) as the input. None only
        when the image was refused.
    faces : tuple of FaceRecord
        Every face found (empty when none was).
    action : str
        ``"faces"`` (each face region replaced), ``"whole-image"`` (no face found; everything stylized),
        ``"refused"`` (no face found and the policy refuses such images), or ``"passed"`` (no face found and the
        caller's policy said the image holds none).
    message : str
        One line for logs and the command line.
    """

    image: Image.Image | None
    faces: tuple[FaceRecord, ...]
    action: str
    message: str

    @property
    def no_face(self) -> bool:
        return len(self.faces) == 0

    @property
    def refused(self) -> bool:
        return self.action == "refused"

    @property
    def any_matched(self) -> bool:
        return any(f.matched for f in self.faces)

    def to_dict(self) -> dict:
        return {"action": self.action, "message": self.message, "faces": [f.to_dict() for f in self.faces]}


@dataclass(frozen=True)
class Detection:
    """The faces found in one photo, computed once and reused (``facefl anonymize`` describes every input before it
    anonymizes any, for the gallery): MTCNN's ``boxes`` float ``[F, 4]``, ``scores`` ``[F]``, ``landmarks``
    ``[F, 5, 2]``, and, when a recognizer described them, each face's descriptor (None where it could not)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    descriptors: tuple = ()

    def __len__(self) -> int:
        return len(self.scores)


# ----------------------------------------------------------------------------------------------- region filters
class StyleFilter:
    """The feed-forward stylizer applied to each region at a working size, resized back.

    The working size is the region's own side (rounded to a multiple of 4) clamped to ``[work_size,
    max_work_size]``: small faces are stylized at the size the stylizer was trained at, large ones at up to
    ``max_work_size`` (default twice that) so that a face of a high-resolution photo is not rebuilt from a
    128-pixel thumbnail (a blurred face drifts toward dlib's "blurry face" and is matched more often).

    ``model`` maps float ``[B, 3, S, S]`` in [0, 1] to the same; a
    :class:`common.anonymization.stylizer.StyleNet`, or its TorchScript export."""

    def __init__(self, model: torch.nn.Module, *, work_size: int = 128, max_work_size: int | None = None,
                 name: str = "style") -> None:
        if work_size < 16:
            raise ValueError(f"work_size must be at least 16 pixels, got {work_size}.")
        self.model = model.eval()
        self.work_size = int(work_size)
        self.max_work_size = int(max_work_size) if max_work_size is not None else 2 * self.work_size
        if self.max_work_size < self.work_size:
            raise ValueError(f"max_work_size ({max_work_size}) must be at least work_size ({work_size}).")
        self.name = name

    def size_for(self, region: torch.Tensor) -> int:
        side = 4 * round(max(region.shape[-2:]) / 4)
        return min(max(side, self.work_size), self.max_work_size)

    @torch.inference_mode()
    def __call__(self, region: torch.Tensor) -> torch.Tensor:
        return self.batch([region])[0]

    @torch.inference_mode()
    def batch(self, regions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Stylize several regions, one forward pass per working size."""
        out: list[torch.Tensor | None] = [None] * len(regions)
        by_size: dict[int, list[int]] = {}
        for i, r in enumerate(regions):
            by_size.setdefault(self.size_for(r), []).append(i)
        for s, idx in by_size.items():
            x = torch.stack([F.interpolate(regions[i][None], size=(s, s), mode="bilinear", align_corners=False,
                                           antialias=True)[0] for i in idx])
            y = self.model(x).clamp(0.0, 1.0)
            for j, i in enumerate(idx):
                out[i] = F.interpolate(y[j : j + 1], size=tuple(regions[i].shape[-2:]), mode="bilinear",
                                       align_corners=False)[0]
        return out  # type: ignore[return-value]


class WholeImageStyle:
    """Stylize a whole image (the fail-closed path): at most ``max_side`` pixels on the longer side, then resized
    back to full size."""

    def __init__(self, model: torch.nn.Module, *, max_side: int = 768) -> None:
        self.model = model.eval()
        self.max_side = int(max_side)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = min(1.0, self.max_side / max(h, w))
        size = (max(16, round(h * scale)), max(16, round(w * scale)))
        x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
        y = self.model(x).clamp(0.0, 1.0)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)[0]


class GatysFilter:
    """Gatys et al. optimisation of each face region (the slow reference method; seconds to minutes per face)."""

    def __init__(self, style: torch.Tensor, *, steps: int = 150, work_size: int = 128, feature_net=None,
                 identity_model=None, identity_weight: float = 0.0, name: str = "gatys", **loss_weights) -> None:
        self.style, self.steps, self.work_size = style, int(steps), int(work_size)
        self.feature_net, self.identity_model, self.identity_weight = feature_net, identity_model, identity_weight
        self.loss_weights = loss_weights
        self.name = name

    def __call__(self, region: torch.Tensor) -> torch.Tensor:
        from common.anonymization.gatys import gatys_stylize

        s = self.work_size
        x = F.interpolate(region[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.clamp(0.0, 1.0)  # antialiased resampling overshoots slightly at sharp edges
        y = gatys_stylize(x, self.style, feature_net=self.feature_net, steps=self.steps,
                          identity_model=self.identity_model, identity_weight=self.identity_weight,
                          **self.loss_weights)
        return F.interpolate(y[None], size=tuple(region.shape[-2:]), mode="bilinear", align_corners=False)[0]


class BlurFilter:
    """Gaussian blur with ``radius`` given as a fraction of the region's side (resolution independent)."""

    def __init__(self, radius_fraction: float) -> None:
        if radius_fraction <= 0:
            raise ValueError(f"blur radius must be positive, got {radius_fraction}.")
        self.radius_fraction = float(radius_fraction)
        self.name = f"blur-{radius_fraction:g}"

    def __call__(self, region: torch.Tensor) -> torch.Tensor:
        img = tensor_to_pil(region)
        radius = self.radius_fraction * max(img.size)
        return pil_to_tensor(img.filter(ImageFilter.GaussianBlur(radius)))


class PixelateFilter:
    """Pixelation of the region into ``blocks`` x ``blocks`` cells."""

    def __init__(self, blocks: int) -> None:
        if blocks < 1:
            raise ValueError(f"pixelation needs at least one block, got {blocks}.")
        self.blocks = int(blocks)
        self.name = f"pixelate-{blocks}"

    def __call__(self, region: torch.Tensor) -> torch.Tensor:
        h, w = region.shape[-2:]
        small = F.adaptive_avg_pool2d(region[None], (min(self.blocks, h), min(self.blocks, w)))
        return F.interpolate(small, size=(h, w), mode="nearest")[0]


# --------------------------------------------------------------------------------------------------- conversions
def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode) to float RGB ``[3, H, W]`` in [0, 1]."""
    return image_to_tensor(img).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float ``[3, H, W]`` in [0, 1] to an RGB PIL image (rounded)."""
    arr = x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


# ------------------------------------------------------------------------------------------------------- geometry
def face_region(box: Sequence[float], width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The square region (x0, y0, x1, y1), clipped to the image, that holds a face box grown by ``margin`` of its
    size on every side (hair line, jaw, ears)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    half = side / 2.0
    x0, y0 = max(0, math.floor(cx - half)), max(0, math.floor(cy - half))
    xe, ye = min(width, math.ceil(cx + half)), min(height, math.ceil(cy + half))
    return x0, y0, max(xe, x0 + 1), max(ye, y0 + 1)


def feathered_mask(region: tuple[int, int, int, int], box: Sequence[float], *, margin: float,
                   feather: float) -> torch.Tensor:
    """``[h, w]`` weights in [0, 1] over ``region``: 1 inside an ellipse around the face box grown by ``margin``,
    falling smoothly to 0 over ``feather`` of the face size outside it (no visible seam when blended)."""
    x0, y0, x1r, y1r = region
    bx1, by1, bx2, by2 = (float(v) for v in box)
    cx, cy = (bx1 + bx2) / 2.0, (by1 + by2) / 2.0
    ax = max((bx2 - bx1) / 2.0 * (1.0 + margin), 1.0)
    ay = max((by2 - by1) / 2.0 * (1.0 + margin), 1.0)
    ys = torch.arange(y0, y1r, dtype=torch.float32) + 0.5
    xs = torch.arange(x0, x1r, dtype=torch.float32) + 0.5
    # Normalised elliptical radius: 1 on the ellipse.
    r = torch.sqrt(((xs[None, :] - cx) / ax) ** 2 + ((ys[:, None] - cy) / ay) ** 2)
    t = ((r - 1.0) / max(feather, 1e-3)).clamp(0.0, 1.0)
    return 1.0 - t * t * (3.0 - 2.0 * t)  # smoothstep falloff


# ------------------------------------------------------------------------------------------------------ pipeline
@dataclass
class Anonymizer:
    """Detect, filter, blend. Configure once, call on many images.

    Parameters
    ----------
    region_filter : RegionFilter
        What replaces each face region.
    whole_image : callable, optional
        Applied to the whole image (float ``[3, H, W]``) when no face is found and ``no_face="whole"``;
        default: ``region_filter`` on the whole image.
    detector : common.data.preprocess.FaceAligner, optional
        MTCNN; default one with ``min_score=0.6`` (a false alarm costs some stylized background, a miss costs
        a person's privacy) and detection on a copy downscaled to at most 1024 px.
    strength : float in (0, 1], default 1.0
        Blend of filtered and original pixels inside the face mask.
    no_face : {"whole", "refuse", "pass"}, default "whole"
        What to do when no face is found: stylize everything (fail closed), refuse the image, or pass it
        unchanged (only for callers that know the image holds no face).
    margin, feather : float
        Face box growth and mask falloff, as fractions of the face size.
    recognizer : Recognizer, optional
        When given, every face gets a re-identification distance (original against anonymized).
    face_prior : callable, optional
        ``face_prior(image [3, H, W], landmarks [F, 5, 2]) -> [3, H, W]``, applied before the regions are filtered:
        :class:`common.anonymization.face_prior.FacePrior` replaces each inner face by a generic face on the same
        landmarks, so that what gets stylized no longer carries the person's features.
    """

    region_filter: RegionFilter
    whole_image: object | None = None
    detector: object | None = None
    strength: float = 1.0
    no_face: str = "whole"
    margin: float = 0.25
    feather: float = 0.25
    recognizer: Recognizer | None = None
    face_prior: object | None = None
    _stats: dict = field(default_factory=lambda: {"images": 0, "faces": 0, "no-face": 0, "refused": 0})

    def __post_init__(self) -> None:
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}.")
        if self.no_face not in NO_FACE_POLICIES:
            raise ValueError(f"no_face must be one of {', '.join(NO_FACE_POLICIES)}; got {self.no_face!r}.")
        if self.margin < 0 or self.feather <= 0:
            raise ValueError("margin must be >= 0 and feather > 0 (fractions of the face size).")
        if self.detector is None:
            from common.data.preprocess import FaceAligner

            self.detector = FaceAligner(min_score=0.6, max_detect_side=1024)

    @property
    def stats(self) -> dict:
        """Counts over every call: images, faces, images with no face, images refused."""
        return dict(self._stats)

    def detect(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.detector.detect(img)

    def describe(self, img: Image.Image) -> Detection:
        """Detect the faces of ``img`` and, with a recognizer, describe each (see :class:`Detection`)."""
        rgb = to_rgb(img)
        boxes, scores, points = self.detect(rgb)
        descriptors = ()
        if self.recognizer is not None and len(scores):
            arr = np.asarray(rgb, dtype=np.uint8)
            descriptors = tuple(self.recognizer.describe(arr, box) for box in boxes)
        return Detection(boxes, scores, points, descriptors)

    def __call__(self, img: Image.Image, *, strength: float | None = None, faces: Detection | None = None,
                 passes: int = 1) -> AnonymizationResult:
        """Anonymize one image (any PIL mode; grayscale stays grayscale). ``strength`` overrides the default.

        ``faces``: the image's faces when they are already known (:meth:`describe`), so they are not detected and
        described again. ``passes``: how many times each face region is painted over (the face prior and the
        filter); a second pass, over the first one's output at the same faces, moves a face that still resembles
        its person further away (the egress gate's retry)."""
        strength = float(self.strength if strength is None else strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}.")
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be a positive integer, got {passes!r}.")
        grayscale = img.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1")
        rgb = to_rgb(img)
        self._stats["images"] += 1
        if faces is None:
            boxes, scores, points = self.detect(rgb)
        else:
            boxes, scores, points = faces.boxes, faces.scores, faces.landmarks
        original = pil_to_tensor(rgb)
        if len(scores) == 0:
            self._stats["no-face"] += 1
            if self.no_face == "refuse":
                self._stats["refused"] += 1
                return AnonymizationResult(None, (), "refused", "no face found; refused (policy: refuse)")
            if self.no_face == "pass":
                return AnonymizationResult(_restore_mode(rgb, grayscale), (), "passed",
                                           "no face found; passed unchanged (policy: pass)")
            whole = self.whole_image or self.region_filter
            out = original + strength * (whole(original) - original)
            return AnonymizationResult(_restore_mode(tensor_to_pil(out), grayscale), (), "whole-image",
                                       "no face found; the whole image was stylized (fail closed)")
        out = original
        h, w = original.shape[-2:]
        regions = [face_region(b, w, h, self.margin) for b in boxes]
        masks = [feathered_mask(region, box, margin=self.margin, feather=self.feather) * strength
                 for region, box in zip(regions, boxes)]
        batch = getattr(self.region_filter, "batch", None)
        for _ in range(passes):
            source = self.face_prior(out, points) if self.face_prior is not None else out
            crops = [source[:, y0:y1, x0:x1] for (x0, y0, x1, y1) in regions]
            filtered = batch(crops) if batch is not None else [self.region_filter(c) for c in crops]
            out = out.clone()
            for (x0, y0, x1, y1), mask, new in zip(regions, masks, filtered):
                current = out[:, y0:y1, x0:x1]
                out[:, y0:y1, x0:x1] = current + mask * (new - current)
        result_rgb = tensor_to_pil(out)
        known = faces.descriptors if faces is not None and len(faces.descriptors) == len(scores) else None
        records = self._records(rgb, result_rgb, boxes, scores, points, known)
        self._stats["faces"] += len(records)
        n = len(records)
        message = f"{n} face{'s' if n != 1 else ''} anonymized"
        if self.recognizer is not None:
            still = sum(1 for r in records if r.matched)
            message += f"; {still} still matched by {self.recognizer.name}" if still else \
                f"; none matched by {self.recognizer.name}"
        return AnonymizationResult(_restore_mode(result_rgb, grayscale), records, "faces", message)

    def score(self, original: Image.Image, anonymized: Image.Image, faces: Detection) -> tuple[FaceRecord, ...]:
        """The records of ``faces`` (of ``original``) in ``anonymized``: with a recognizer, each face's distance to
        its original (from ``faces.descriptors`` when they are given)."""
        known = faces.descriptors if len(faces.descriptors) == len(faces) else None
        return self._records(to_rgb(original), to_rgb(anonymized), faces.boxes, faces.scores, faces.landmarks, known)

    def _records(self, original: Image.Image, anonymized: Image.Image, boxes, scores, points,
                 known=None) -> tuple[FaceRecord, ...]:
        records = []
        orig_arr = anon_arr = None
        if self.recognizer is not None:
            orig_arr = np.asarray(original, dtype=np.uint8)
            anon_arr = np.asarray(anonymized, dtype=np.uint8)
        for i, (box, score, lm) in enumerate(zip(boxes, scores, points)):
            dist = matched = a = b = None
            if self.recognizer is not None:
                a = known[i] if known is not None else self.recognizer.describe(orig_arr, box)
                b = self.recognizer.describe(anon_arr, box)
                if a is not None and b is not None:
                    dist = float(self.recognizer.distance(a, b))
                    matched = dist < float(self.recognizer.THRESHOLD)
            records.append(FaceRecord(tuple(float(v) for v in box), float(score), np.asarray(lm, np.float32),
                                      dist, matched, b, a))
        return tuple(records)


def _restore_mode(img: Image.Image, grayscale: bool) -> Image.Image:
    return img.convert("L") if grayscale else img
