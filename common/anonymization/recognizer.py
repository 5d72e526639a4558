"""dlib's ResNet face descriptor as an independent recognizer, for re-identification tests of anonymizers.

The recognizer shares nothing with the project's models: a 128-d descriptor from dlib's
``dlib_face_recognition_resnet_model_v1`` (99.38% on LFW as reported by dlib), aligned by dlib's 5-point
shape predictor. Two faces are the same person when their descriptors are closer than 0.6 (Euclidean),
dlib's standard threshold.

The model files come from the ``face-recognition-models`` wheel, located on disk without importing the
package (its ``__init__`` imports ``pkg_resources``, which new setuptools no longer ships). Nothing is
downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.dlib_weights import DESCRIPTOR_MODEL_FILE, SHAPE_PREDICTOR_FILE, dlib_models_dir

INSTALL_HINT = "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0"
# A box narrower or shorter than this (pixels) cannot hold a face the shape predictor can place points in.
MIN_BOX_SIDE = 4.0


class RecognizerUnavailable(RuntimeError):
    """dlib or its model files are not installed; the message names the packages to install."""


def default_model_dir() -> Path:
    """The ``models`` folder of the installed ``face-recognition-models`` package (found, not imported).

    Raises
    ------
    RecognizerUnavailable
        When the package is not installed.
    """
    try:
        return dlib_models_dir()
    except FileNotFoundError:
        raise RecognizerUnavailable(
            f"The face-recognition-models package (dlib's model files) is not installed; {INSTALL_HINT}."
        ) from None


class DlibRecognizer:
    """dlib's 5-point shape predictor + ResNet face descriptor (128-d, float64).

    Not thread-safe: use one instance per thread.

    Parameters
    ----------
    model_dir : path, optional
        Folder holding ``shape_predictor_5_face_landmarks.dat`` and
        ``dlib_face_recognition_resnet_model_v1.dat``. Default: the installed ``face-recognition-models``
        package's ``models`` folder.
    num_jitters : int, default 0
        Extra randomly jittered copies averaged into each descriptor (dlib's option; 0 = deterministic).
    padding : float, default 0.25
        Context around the aligned face chip, as a fraction of its size (dlib's default).

    Raises
    ------
    RecognizerUnavailable
        When dlib or a model file is missing.
    """

    THRESHOLD = 0.6
    name = "dlib-resnet-v1"

    def __init__(
        self, model_dir: str | os.PathLike | None = None, *, num_jitters: int = 0, padding: float = 0.25
    ) -> None:
        if not isinstance(num_jitters, int) or num_jitters < 0:
            raise ValueError(f"num_jitters must be a non-negative integer, got {num_jitters!r}.")
        if not 0.0 <= padding <= 1.0:
            raise ValueError(f"padding must be in [0, 1], got {padding!r}.")
        try:
            import dlib
        except ImportError as exc:
            raise RecognizerUnavailable(f"dlib cannot be imported ({exc}); {INSTALL_HINT}.") from None
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        missing = [f for f in (SHAPE_PREDICTOR_FILE, DESCRIPTOR_MODEL_FILE) if not (folder / f).is_file()]
        if missing:
            raise RecognizerUnavailable(
                f"dlib model file(s) {', '.join(missing)} not found in {folder}; pass model_dir the folder "
                f"that holds them, or {INSTALL_HINT}."
            )
        self._dlib = dlib
        self.model_dir = folder
        self.num_jitters = num_jitters
        self.padding = float(padding)
        self._shape_predictor = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
        self._descriptor = dlib.face_recognition_model_v1(str(folder / DESCRIPTOR_MODEL_FILE))
        self._hog = None  # built on first use of detect()

    @staticmethod
    def _check_image(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image must be a uint8 RGB array [H, W, 3], got dtype {image.dtype} and shape {image.shape} "
                "(convert with np.asarray(common.data.preprocess.to_rgb(img)))."
            )
        return np.ascontiguousarray(image)

    def describe(self, image: np.ndarray, box: Sequence[float] | np.ndarray) -> np.ndarray | None:
        """The face descriptor of the face in ``box``.

        Parameters
        ----------
        image : np.ndarray
            uint8 ``[H, W, 3]``, RGB.
        box : sequence of 4 floats
            ``(x1, y1, x2, y2)`` in image coordinates (an MTCNN box, or one from :meth:`detect`). It may
            extend past the image border.

        Returns
        -------
        np.ndarray or None
            float64 ``[128]``. None when the box is not finite, smaller than 4 pixels a side, or does not
            overlap the image (there is nothing to describe). Any region that passes these checks gets a
            descriptor, face or not: whether it still looks like the person is what the distance measures.
        """
        image = self._check_image(image)
        coords = np.asarray(box, dtype=np.float64).reshape(-1)
        if coords.size != 4:
            raise ValueError(f"box must hold 4 numbers (x1, y1, x2, y2), got {box!r}.")
        x1, y1, x2, y2 = (float(v) for v in coords)
        h, w = image.shape[:2]
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return None
        if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE or x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            return None
        rect = self._dlib.rectangle(round(x1), round(y1), round(x2), round(y2))
        shape = self._shape_predictor(image, rect)
        vector = self._descriptor.compute_face_descriptor(image, shape, self.num_jitters, self.padding)
        return np.asarray(vector, dtype=np.float64)

    def detect(self, image: np.ndarray, *, upsample: int = 1) -> list[tuple[float, float, float, float]]:
        """Faces found by dlib's HOG frontal-face detector, for callers without a box.

        Parameters
        ----------
        image : np.ndarray
            uint8 ``[H, W, 3]``, RGB.
        upsample : int, default 1
            Times the image is doubled before detection (finds faces down to ~40 px instead of ~80 px).

        Returns
        -------
        list of (x1, y1, x2, y2)
            Float boxes in image coordinates, in dlib's order; empty when none is found.
        """
        image = self._check_image(image)
        if self._hog is None:
            self._hog = self._dlib.get_frontal_face_detector()
        rects = self._hog(image, upsample)
        return [(float(r.left()), float(r.top()), float(r.right()), float(r.bottom())) for r in rects]

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between two descriptors."""
        return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))

    def matches(self, a: np.ndarray, b: np.ndarray) -> bool:
        """True when two descriptors are of the same person by dlib's rule: distance below ``THRESHOLD``."""
        return self.distance(a, b) < self.THRESHOLD
