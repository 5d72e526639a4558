"""Re-identification of anonymized faces by an independent recognizer: pure measurements, no printing.

Protocol (one row of ``facefl bench anonymize``): each person brings two photos. Image 1 is anonymized by
the transform under test; image 2 stays original and forms, for all people together, the gallery. The
recognizer describes the transformed image 1 inside the box MTCNN found on the ORIGINAL image 1 (an
attacker knows where the face is, so a transform that merely defeats the detector is not counted as
anonymization), then asks two questions:

- match: is it closer than the recognizer's threshold to the same person's original image 2?
- top-1: is the same person's image 2 its nearest neighbour in the gallery? (chance: 1 / people)

MTCNN is run again on the transformed image to report whether a face is still found there (a usable
anonymizer keeps the face detectable) and how far its 5 landmarks moved, in inter-ocular distances.

Originals are detected and described once per :class:`ReidBench` and reused for every transform.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from common.anonymization.recognizer import DlibRecognizer
from common.data.datasets import DataError, read_pairs_file
from common.data.preprocess import FaceAligner, to_rgb

Transform = Callable[[Image.Image], "Image.Image | None"]
Person = tuple[str, Image.Image, Image.Image]


@dataclass(frozen=True)
class ReidReport:
    """How well one transform hides identity from the recognizer, and what it costs.

    Attributes
    ----------
    name : str
        The transform's label.
    people : int
        People measured (each contributes one transformed image).
    match_rate : float
        Fraction of people whose transformed image 1 still matches their original image 2 at the
        recognizer's threshold. Lower is better anonymization.
    top1 : float
        Fraction of people whose transformed image 1 has their own original image 2 as nearest neighbour
        among all people's image 2. Compare with ``chance``.
    chance : float
        ``1 / people``: the top-1 rate of a transform that leaves no identity at all.
    detection_rate : float
        Fraction of transformed images in which MTCNN still finds a face (score >= the aligner's
        ``min_score``), anywhere in the image.
    landmark_displacement : float
        Median over people whose transformed face was re-detected (a detection overlapping the original
        box) of the mean distance of the 5 MTCNN landmarks from their original positions, in units of the
        original inter-ocular distance. NaN when no face was re-detected.
    landmark_displacement_mean : float
        The mean of the same per-person values (NaN when none).
    hog_retention : float
        Of the people whose ORIGINAL image 1 dlib's HOG face detector finds (a second detector, independent of
        MTCNN, which the stylizer's structure term is trained against), the fraction whose transformed image 1 it
        still finds (a detection overlapping the original box). NaN when no HOG detector was given.
    source_match_rate : float
        Fraction of people whose transformed image 1 still matches the ORIGINAL image 1 (the photo it came from):
        what the egress gate checks. ``match_rate`` is what an attacker holding another photo of the person gets.
    gate_withheld_rate : float
        Fraction of people whose transformed image 1 matches either its source photo or the person's other photo:
        what an egress gate holding both (:meth:`common.anonymization.egress.EgressGate.add_to_gallery`) withholds.
    refused : int
        Images the transform returned None for. A refused image counts as not matched, not top-1 and
        not detected.
    seconds : float
        Wall-clock time spent inside the transform, all images together.
    images_per_second : float
        Images given to the transform (refused ones included) per second of ``seconds``.
    """

    name: str
    people: int
    match_rate: float
    top1: float
    chance: float
    detection_rate: float
    landmark_displacement: float
    landmark_displacement_mean: float
    hog_retention: float
    source_match_rate: float
    gate_withheld_rate: float
    refused: int
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class _Original:
    name: str
    image: Image.Image  # image 1, RGB
    box: np.ndarray  # float64 [4], MTCNN box of the face in image 1
    landmarks: np.ndarray  # float64 [5, 2], its MTCNN landmarks
    iod: float  # inter-ocular distance of those landmarks, pixels
    descriptor: np.ndarray  # the recognizer's descriptor of the face in image 1 (what the gate compares with)
    hog_found: bool  # whether the HOG detector finds the face in image 1


def _main_face(aligner: FaceAligner, img: Image.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """Box ``[4]`` and landmarks ``[5, 2]`` of the largest confident MTCNN face (as ``FaceAligner.align``)."""
    boxes, scores, points = aligner.detect(img)
    if len(scores) == 0:
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = int(np.lexsort((-scores, -areas))[0])  # largest face; ties broken by confidence
    return boxes[best].astype(np.float64), points[best].astype(np.float64)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box ``[4]`` with each of ``boxes`` ``[F, 4]``."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


class ReidBench:
    """Originals of a set of people, detected and described once, against which transforms are measured.

    Parameters
    ----------
    people : list of (name, image1, image2)
        Two PIL photos of each person (any mode). Names must be distinct.
    recognizer : DlibRecognizer
        The independent recognizer (anything with ``describe(array, box)``, ``distance(a, b)``,
        ``THRESHOLD`` and ``name``).
    aligner : FaceAligner
        MTCNN, for the original boxes and for detection on transformed images.
    hog : HogDetector, optional
        A second face detector (dlib's HOG) for :attr:`ReidReport.hog_retention`.

    Attributes
    ----------
    names : tuple of str
        People kept, in input order.
    dropped : tuple of str
        People left out because MTCNN or the recognizer found no face in one of their ORIGINAL photos
        (they cannot be measured under this protocol).

    Raises
    ------
    ValueError
        When names repeat, or no person is left to measure.
    """

    def __init__(self, people: Sequence[Person], *, recognizer: DlibRecognizer, aligner: FaceAligner,
                 hog: "HogDetector | None" = None) -> None:
        names = [p[0] for p in people]
        if len(set(names)) != len(names):
            raise ValueError("Each person must appear once in people (names repeat); pass one pair per person.")
        self.recognizer = recognizer
        self.aligner = aligner
        self.hog = hog
        originals: list[_Original] = []
        gallery: list[np.ndarray] = []
        dropped: list[str] = []
        for name, image1, image2 in people:
            image1, image2 = to_rgb(image1), to_rgb(image2)
            face1, face2 = _main_face(aligner, image1), _main_face(aligner, image2)
            if face1 is None or face2 is None:
                dropped.append(name)
                continue
            iod = float(np.linalg.norm(face1[1][1] - face1[1][0]))
            reference = recognizer.describe(np.asarray(image2), face2[0])
            source = recognizer.describe(np.asarray(image1), face1[0])
            if reference is None or source is None or iod <= 0.0:
                dropped.append(name)
                continue
            hog_found = hog is not None and hog.finds(image1, face1[0])
            originals.append(_Original(name, image1.copy(), face1[0], face1[1], iod, source, hog_found))
            gallery.append(reference)
        if not originals:
            raise ValueError(
                f"None of the {len(names)} people has a face that MTCNN finds in both original photos; "
                "pass frontal face photos (e.g. from lfw_test_people)."
            )
        self._originals = tuple(originals)
        self._gallery = tuple(gallery)
        self.names = tuple(o.name for o in originals)
        self.dropped = tuple(dropped)

    def __len__(self) -> int:
        return len(self._originals)

    def measure(self, transform: Transform, name: str) -> ReidReport:
        """Anonymize every person's image 1 with ``transform`` and measure re-identification.

        Parameters
        ----------
        transform : callable
            PIL image (RGB, a fresh copy) in, PIL image out, or None to refuse it. The output may have
            another size than the input: it is taken to show the same frame, rescaled, so the original
            box and landmarks are scaled to it.
        name : str
            Label for the report.

        Returns
        -------
        ReidReport
        """
        n = len(self._originals)
        matched = top1 = detected = refused = source_matched = hog_kept = withheld = 0
        displacements: list[float] = []
        seconds = 0.0
        for i, orig in enumerate(self._originals):
            source = orig.image.copy()  # a transform that edits in place must not touch the cached original
            start = time.perf_counter()
            out = transform(source)
            seconds += time.perf_counter() - start
            if out is None:
                refused += 1
                continue
            if not isinstance(out, Image.Image):
                raise TypeError(
                    f"Transform {name!r} returned {type(out).__name__}; it must return a PIL image, or None to refuse."
                )
            out = to_rgb(out)
            scale = np.array([out.width / orig.image.width, out.height / orig.image.height])

            descriptor = self.recognizer.describe(np.asarray(out), orig.box * np.tile(scale, 2))
            if descriptor is not None:
                distances = np.array([self.recognizer.distance(descriptor, g) for g in self._gallery])
                matched += bool(distances[i] < self.recognizer.THRESHOLD)
                top1 += int(np.argmin(distances)) == i
                to_source = self.recognizer.distance(descriptor, orig.descriptor) < self.recognizer.THRESHOLD
                source_matched += bool(to_source)
                withheld += bool(to_source or distances[i] < self.recognizer.THRESHOLD)
            if orig.hog_found and self.hog.finds(out, orig.box * np.tile(scale, 2)):
                hog_kept += 1

            boxes, _, points = self.aligner.detect(out)  # already filtered to score >= min_score
            if len(boxes) == 0:
                continue
            detected += 1
            boxes = boxes.astype(np.float64) / np.tile(scale, 2)  # back to original-image coordinates
            overlap = _iou(orig.box, boxes)
            best = int(np.argmax(overlap))
            if overlap[best] > 0.0:
                moved = np.linalg.norm(points[best].astype(np.float64) / scale - orig.landmarks, axis=1)
                displacements.append(float(moved.mean()) / orig.iod)

        return ReidReport(
            name=name,
            people=n,
            match_rate=matched / n,
            top1=top1 / n,
            chance=1.0 / n,
            detection_rate=detected / n,
            landmark_displacement=statistics.median(displacements) if displacements else math.nan,
            landmark_displacement_mean=statistics.fmean(displacements) if displacements else math.nan,
            hog_retention=hog_kept / hog_total if (hog_total := sum(o.hog_found for o in self._originals)) else math.nan,
            source_match_rate=source_matched / n,
            gate_withheld_rate=withheld / n,
            refused=refused,
            seconds=seconds,
            images_per_second=n / seconds if seconds > 0 else math.inf,
        )


    def measure_released(self, released, name: str) -> ReidReport:
        """:meth:`measure` for images anonymized elsewhere (``facefl anonymize``'s written files): ``released`` maps
        each person's name to their anonymized image 1, or None when it was withheld (counted as refused)."""
        images = iter([released.get(o.name) for o in self._originals])
        return self.measure(lambda _: next(images), name)


class HogDetector:
    """dlib's HOG + linear SVM frontal face detector (``dlib.get_frontal_face_detector``, from the installed
    package): a second detector, independent of MTCNN, for "is the face still there".

    ``upsample``: image doublings before detection (1 finds faces down to about 40 px, as dlib's examples use)."""

    name = "dlib HOG"

    def __init__(self, upsample: int = 1) -> None:
        try:
            import dlib
        except ImportError as exc:
            from common.anonymization.recognizer import INSTALL_HINT, RecognizerUnavailable

            raise RecognizerUnavailable(f"dlib is not installed ({exc}); {INSTALL_HINT}") from None
        self._detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)

    def boxes(self, image: Image.Image) -> np.ndarray:
        """float ``[F, 4]`` ``(x1, y1, x2, y2)`` of the faces found in ``image``."""
        rects = self._detector(np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8)), self.upsample)
        return np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64).reshape(-1, 4)

    def finds(self, image: Image.Image, box: np.ndarray) -> bool:
        """Whether a face is found overlapping ``box`` (``[4]``, image coordinates)."""
        found = self.boxes(image)
        return bool(len(found)) and bool((_iou(np.asarray(box, np.float64), found) > 0.0).any())


def measure_reid(
    people: Sequence[Person],
    transform: Transform,
    *,
    recognizer: DlibRecognizer,
    aligner: FaceAligner,
    name: str,
) -> ReidReport:
    """Measure one transform on ``people`` (see :class:`ReidBench`; use it directly for several transforms).

    Raises
    ------
    ValueError
        When no person has a detectable face in both original photos. People with no face in an original
        photo are left out of the report (``people`` counts those measured).
    """
    return ReidBench(people, recognizer=recognizer, aligner=aligner).measure(transform, name)


# --------------------------------------------------------------------------------------------------
# People: LFW View-1 test identities
# --------------------------------------------------------------------------------------------------


def lfw_test_people(
    lfw_root: str | os.PathLike, count: int, *, seed: int | None = None, skip: int = 0
) -> list[tuple[str, Path, Path]]:
    """People of the matched pairs of LFW View 1 ``pairsDevTest.txt`` (identities never used in training).

    Each person appears once, with the two images of their first matched pair line.

    Parameters
    ----------
    lfw_root : path
        The LFW root.
    count : int
        How many people.
    seed : int, optional
        None (default): the first ``count`` distinct people in file order. An integer: a sample of
        ``count`` of them drawn with ``random.Random(seed)``, returned in file order. Both deterministic.
    skip : int, default 0
        Leave out the first ``skip`` people in file order first (``skip=150`` gives people disjoint from the
        benchmark's 150: a held-out check).

    Returns
    -------
    list of (name, image_i_path, image_j_path)

    Raises
    ------
    DataError
        When the pairs file is missing or malformed, or ``count`` exceeds the people it holds.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}.")
    root = Path(lfw_root)
    people: dict[str, tuple[Path, Path]] = {}
    for pair in read_pairs_file(root / "pairsDevTest.txt"):
        if pair.same and pair.name_a not in people:
            people[pair.name_a] = (root / pair.relpath_a, root / pair.relpath_b)
    names = list(people)[skip:]
    if count > len(names):
        raise DataError(
            f"{root / 'pairsDevTest.txt'} has matched pairs of {len(people)} distinct people; "
            f"asked for {count} after skipping {skip} (pass at most {len(names)})."
        )
    if seed is not None:
        chosen = set(random.Random(seed).sample(names, count))
        names = [n for n in names if n in chosen]
    return [(n, *people[n]) for n in names[:count]]


def open_people(people: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]]) -> list[Person]:
    """Read the two photos of each ``(name, path1, path2)`` as RGB PIL images (fully loaded, files closed).

    Raises
    ------
    DataError
        When a photo is missing or unreadable, naming it.
    """
    out: list[Person] = []
    for name, *paths in people:
        images = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    images.append(to_rgb(img).copy())
            except FileNotFoundError:
                raise DataError(f"Missing image {path} (check the LFW root).") from None
            except Exception as exc:  # noqa: BLE001  (PIL raises many types on corrupt data)
                raise DataError(f"Cannot read image {path}: {exc} (replace it with the original file).") from None
        out.append((name, images[0], images[1]))
    return out


# --------------------------------------------------------------------------------------------------
# Baseline anonymizers: the trivial transforms a stylizer has to beat
# --------------------------------------------------------------------------------------------------


def identity_transform(img: Image.Image) -> Image.Image:
    """No anonymization: the image unchanged (the recognizer's ceiling)."""
    return img


def gaussian_blur(radius: float) -> Transform:
    """Blur the whole image with PIL's ``GaussianBlur(radius)`` (radius in pixels, the standard deviation)."""
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius!r}.")

    def blur(img: Image.Image) -> Image.Image:
        return to_rgb(img).filter(ImageFilter.GaussianBlur(radius))

    blur.__name__ = f"gaussian_blur_r{radius:g}"
    return blur


def pixelate(blocks: int) -> Transform:
    """Pixelate the whole image to ``blocks x blocks`` cells: box-average down, nearest-neighbour back up."""
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive integer, got {blocks!r}.")

    def pixelated(img: Image.Image) -> Image.Image:
        img = to_rgb(img)
        small = img.resize((blocks, blocks), Image.Resampling.BOX)
        return small.resize(img.size, Image.Resampling.NEAREST)

    pixelated.__name__ = f"pixelate_{blocks}"
    return pixelated
