"""Identity-folder face datasets (LFW, VGGFace2, CASIA-WebFace layout), LFW protocol files, and a face cache.

A dataset root holds one folder per identity: ``root/<identity>/<image>`` with ``.jpg``, ``.jpeg``,
``.png`` or ``.pgm`` images. Faces are cropped (``"crop"``, for already aligned sets such as LFW), detected and
aligned with MTCNN (``"detect"``, for raw photos) or cut as dlib's face chips (``"dlib"``, the input of dlib's face
ResNet), resized to ``image_size`` and cached per identity folder, so a later run with the same (dataset, size,
mode) only re-reads the cache. ``"aligned"`` faces (the input of the models trained from scratch) are dlib's chips
cut tighter and resized, computed from the cached ``"dlib"`` chips.

Bad input never crashes a load: unreadable files, non-image files, photos without a face and identities
with too few images are skipped, counted in ``FaceSet.skipped`` and summarised in one WARNING line on the
``facefl.data`` logger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from common.atomic import atomic_torch_save
from common.config import DLIB_CHIP_SIZE
from common.data.dlib_chips import CHIP_PADDING, DlibChipper
from common.data.faceset import FaceSet
from common.data.preprocess import LFW_CROP_FRACTION, FaceAligner, center_crop_face
from common.weights import default_cache_dir
from common.worker_pool import available_cores, start_pool, stop_pool

logger = logging.getLogger("facefl.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm"})
MODES = ("auto", "crop", "detect", "dlib", "aligned")
# "aligned": the central share of a dlib chip kept (120 of its 150 pixels: the chip's padding of 0.25 face widths
# cut to 0.1), which shows the inner face larger; on LFW View 1 a from-scratch model gained ~1 point over the whole
# chip at 64 px.
ALIGNED_CROP_FRACTION = 0.8
LFW_MARKER_FILES = ("peopleDevTrain.txt", "pairsDevTest.txt")
CACHE_VERSION = 1
# Longest side that detect mode decodes huge JPEGs at (the aligner detects at <= 1024 px anyway).
DETECT_DECODE_SIDE = 1024
# Faces are computed by a pool of worker processes (load_faces(workers=...)); this variable overrides the default
# number of workers (every core this process may use).
PREP_WORKERS_ENV = "FACEFL_PREP_WORKERS"
# A pool of workers is started only when it saves more than it costs: its start-up (the fork server imports torch,
# each worker builds its detector: ~2.7 s on a quiet 2-core AMD EPYC, ~0.6 s for a later pool of the same process)
# against the time the other workers take off this one, from the seconds of one core per photo by mode (same machine:
# a dlib chip ~33 ms, an MTCNN alignment ~120 ms, a centre crop ~0.7 ms). On 2 cores: from ~170 dlib chips, ~60 MTCNN
# alignments, ~9000 centre crops.
PHOTO_SECONDS = {"crop": 0.001, "dlib": 0.035, "detect": 0.12}
POOL_START_SECONDS = 3.0

_DATA_HINT = "pass --data an identity-folder dataset such as LFW, or omit it for the synthetic smoke-test set"


class DataError(ValueError):
    """A dataset or protocol file that cannot be used; the message names the path and what to do."""


class PreparationError(DataError):
    """Face preparation failed in a worker process (a broken dlib or MTCNN install, a crashed worker); the message
    says what to do. Identities finished before the failure stay cached."""


# --------------------------------------------------------------------------------------------------
# LFW protocol files
# --------------------------------------------------------------------------------------------------


def is_lfw_root(root: str | os.PathLike) -> bool:
    """True when ``root`` holds LFW's View 1 protocol files (``peopleDevTrain.txt`` and ``pairsDevTest.txt``)."""
    root = Path(root)
    return all((root / name).is_file() for name in LFW_MARKER_FILES)


def _read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"Protocol file does not exist: {path} (check the LFW root and file name).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read protocol file {path}: {exc} (replace it with the original LFW file).") from None


def _positive_int(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


def read_people_file(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read an LFW people file (``peopleDevTrain.txt``, ``peopleDevTest.txt``, ``people.txt``).

    Lines that are a bare number (the count header, and ``people.txt``'s fold headers) are skipped;
    every other non-blank line must be ``name<TAB>count``.

    Returns
    -------
    list[tuple[str, int]]
        ``(name, number_of_images)`` in file order.

    Raises
    ------
    DataError
        On a malformed line, naming the file and line number.
    """
    people: list[tuple[str, int]] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if not fields or (len(fields) == 1 and fields[0].isdigit()):
            continue
        count = _positive_int(fields[1]) if len(fields) == 2 else None
        if count is None:
            raise DataError(
                f"{path}:{lineno}: expected 'name<TAB>count', got {line.strip()!r} (fix or replace the people file)."
            )
        people.append((fields[0], count))
    return people


def lfw_image_relpath(name: str, index: int) -> str:
    """Path of image ``index`` (1-based) of ``name`` relative to the LFW root: ``name/name_{index:04d}.jpg``."""
    return f"{name}/{name}_{index:04d}.jpg"


@dataclass(frozen=True)
class Pair:
    """One LFW verification pair: image ``index_a`` of ``name_a`` against image ``index_b`` of ``name_b``."""

    name_a: str
    index_a: int
    name_b: str
    index_b: int

    @property
    def same(self) -> bool:
        """True for a matched pair (both images show the same person)."""
        return self.name_a == self.name_b

    @property
    def relpath_a(self) -> str:
        """Path of the first image relative to the LFW root."""
        return lfw_image_relpath(self.name_a, self.index_a)

    @property
    def relpath_b(self) -> str:
        """Path of the second image relative to the LFW root."""
        return lfw_image_relpath(self.name_b, self.index_b)


def read_pairs_file(path: str | os.PathLike) -> list[Pair]:
    """Read an LFW pairs file (``pairsDevTrain.txt``, ``pairsDevTest.txt``, ``pairs.txt``).

    The first line is a header (``count``, or ``folds count`` in ``pairs.txt``); then matched lines
    ``name i j`` and mismatched lines ``name1 i name2 j`` (tab separated), blank lines ignored.

    Returns
    -------
    list[Pair]
        In file order.

    Raises
    ------
    DataError
        On a malformed header or pair line, naming the file and line number.
    """
    lines = _read_lines(path)
    header = lines[0].split() if lines else []
    if not header or len(header) > 2 or not all(f.isdigit() for f in header):
        got = repr(lines[0].strip()) if lines else "an empty file"
        raise DataError(f"{path}:1: expected a header 'count' or 'folds<TAB>count', got {got} (use an LFW pairs file).")
    pairs: list[Pair] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        pair = None
        if len(fields) == 3:
            i, j = _positive_int(fields[1]), _positive_int(fields[2])
            if i is not None and j is not None:
                pair = Pair(fields[0], i, fields[0], j)
        elif len(fields) == 4:
            i, j = _positive_int(fields[1]), _positive_int(fields[3])
            if i is not None and j is not None:
                pair = Pair(fields[0], i, fields[2], j)
        if pair is None:
            raise DataError(
                f"{path}:{lineno}: expected 'name i j' or 'name1 i name2 j' with 1-based image numbers, "
                f"got {line.strip()!r} (fix or replace the pairs file)."
            )
        pairs.append(pair)
    return pairs


def lfw_train_identities(root: str | os.PathLike, min_images: int = 2) -> list[str]:
    """Names listed in ``root/peopleDevTrain.txt`` with at least ``min_images`` images (per that file).

    Raises
    ------
    DataError
        When ``root`` is not an LFW root.
    """
    root = Path(root)
    if not is_lfw_root(root):
        raise DataError(
            f"Not an LFW root: {root} (it needs {' and '.join(LFW_MARKER_FILES)} beside the identity folders; "
            "pass --data the LFW folder)."
        )
    return [name for name, count in read_people_file(root / "peopleDevTrain.txt") if count >= min_images]


# --------------------------------------------------------------------------------------------------
# Loading and caching
# --------------------------------------------------------------------------------------------------


def resolve_mode(mode: str, root: str | os.PathLike) -> str:
    """Return ``"crop"``, ``"detect"``, ``"dlib"`` or ``"aligned"``; ``"auto"`` is ``"crop"`` for an LFW root,
    ``"detect"`` otherwise (``"dlib"`` and ``"aligned"`` are only ever asked for by name)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "auto":
        return "crop" if is_lfw_root(root) else "detect"
    return mode


def tighter_resized(images: torch.Tensor, fraction: float, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` -> the central ``fraction`` of each image, resized (antialiased) to ``[N, 3, size, size]``."""
    side = images.shape[-1]
    keep = int(round(side * fraction))
    start = (side - keep) // 2
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk, :, start : start + keep, start : start + keep].float()
        out[i : i + chunk] = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).round_().clamp_(0, 255)
    return out


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"Dataset path does not exist: {path} ({_DATA_HINT}).")
    if not path.is_dir():
        raise DataError(f"Dataset path is not a directory: {path} ({_DATA_HINT}).")
    return path


def list_identities(root: str | os.PathLike) -> list[str]:
    """Sorted names of the identity folders in ``root`` (hidden folders ignored)."""
    root = _check_root(root)
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


class _Scan(NamedTuple):
    images: list[str]  # image file names, sorted
    non_images: int  # other (non-hidden) files
    fingerprint: str


def _scan_identity(folder: Path) -> _Scan:
    """List an identity folder; the fingerprint hashes the sorted (name, size, mtime_ns) of its files."""
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_file():
                continue
            st = e.stat()
            entries.append((e.name, st.st_size, st.st_mtime_ns))
    entries.sort()
    digest = hashlib.sha1(repr(entries).encode("utf-8")).hexdigest()
    images = [n for n, _, _ in entries if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return _Scan(images, len(entries) - len(images), digest)


@dataclass
class PrepStats:
    """What one :func:`load_faces` call computed rather than read from the cache: pass one as ``stats=``."""

    photos: int = 0  # photos computed (decoded, and detected or cropped)
    identities: int = 0  # identity folders computed
    cached_identities: int = 0  # identity folders read from the cache
    workers: int = 0  # processes that computed them (1: this one; 0: nothing to compute)
    seconds: float = 0.0  # wall time spent computing them

    @property
    def faces_per_second(self) -> float:
        return self.photos / self.seconds if self.seconds > 0 else 0.0


class _Faces(NamedTuple):
    images: torch.Tensor  # uint8 [n, 3, S, S]
    paths: list[str]  # relative to root
    skipped: dict[str, int]  # "unreadable" / "no-face" counts


def _decode_image(path: Path, mode: str, image_size: int) -> Image.Image:
    """Open and fully decode one image file, using JPEG draft mode to decode only the resolution needed."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            w, h = img.size
            if mode == "crop":
                need = image_size / LFW_CROP_FRACTION / min(w, h)  # fraction of full resolution needed
            else:
                need = DETECT_DECODE_SIDE / max(w, h)
            if need < 1.0:
                img.draft("RGB", (max(1, int(w * need) + 1), max(1, int(h * need) + 1)))
        img = ImageOps.exif_transpose(img)
        img.load()
        return img


def _each_then(items: list[str], after: Callable[[], None] | None):
    """Yield each item; call ``after()`` once the loop body is done with it (also when it ``continue``s)."""
    for item in items:
        yield item
        if after is not None:
            after()


def _compute_identity(
    root: Path, identity: str, files: list[str], mode: str, image_size: int, aligner: Callable[[], Callable],
    on_photo: Callable[[], None] | None = None,
) -> _Faces:
    """The faces of ``files`` (of one identity folder), in order; ``on_photo()`` after each file (progress)."""
    faces: list[torch.Tensor] = []
    paths: list[str] = []
    skipped: Counter[str] = Counter()
    for name in _each_then(files, on_photo):
        path = root / identity / name
        try:
            img = _decode_image(path, mode, image_size)
            face = center_crop_face(img, image_size, LFW_CROP_FRACTION) if mode == "crop" else None
        # PIL's decoders raise many exception types (OSError, SyntaxError, ValueError, struct.error,
        # DecompressionBombError, ...) on corrupt data; any of them means "unreadable", never a crash.
        except Exception as exc:  # noqa: BLE001
            logger.debug("Unreadable image %s: %s", path, exc)
            skipped["unreadable"] += 1
            continue
        if face is None:
            detector = aligner()  # outside the try: a broken detector install must fail loudly
            try:
                result = detector(img)
            except (RuntimeError, ValueError, IndexError) as exc:  # MTCNN on a degenerate image
                logger.debug("Face detection failed on %s: %s", path, exc)
                skipped["no-face"] += 1
                continue
            if not result.found:
                skipped["no-face"] += 1
                continue
            face = result.face
        faces.append(face)
        paths.append(f"{identity}/{name}")
    images = torch.stack(faces) if faces else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    return _Faces(images, paths, dict(skipped))


def _cache_settings(mode: str, image_size: int, root: Path) -> dict:
    settings: dict = {"version": CACHE_VERSION, "mode": mode, "image_size": image_size}
    if mode == "crop":
        settings["crop_fraction"] = LFW_CROP_FRACTION
    if mode == "dlib":
        settings.update(_dlib_chipper_options(root), padding=CHIP_PADDING)
    return settings


def _dlib_chipper_options(root: Path) -> dict:
    """LFW images are built around one person: keep the face nearest the centre, and never drop the person."""
    lfw = is_lfw_root(root)
    return {"prefer": "centre" if lfw else "largest", "centre_fallback": lfw}


def _make_detector(mode: str, image_size: int, root: Path) -> Callable:
    """``image -> result`` with ``.found`` and ``.face`` (uint8 ``[3, S, S]``) for the detecting modes."""
    if mode == "dlib":
        return DlibChipper(image_size, padding=CHIP_PADDING, **_dlib_chipper_options(root)).chip
    return FaceAligner(image_size).align


def _read_cache(path: Path, fingerprint: str, settings: dict, image_size: int) -> tuple[_Faces | None, bool]:
    """Return ``(faces, corrupt)``: faces when the cache file is valid and current, else None."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None, False
    except Exception as exc:  # noqa: BLE001  (any damage to the file means: recompute it)
        logger.debug("Corrupt cache file %s: %s", path, exc)
        return None, True
    try:
        if entry["settings"] != settings or entry["fingerprint"] != fingerprint:
            return None, False
        images, paths, skipped = entry["images"], list(entry["paths"]), dict(entry["skipped"])
        valid = (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape[1:]) == (3, image_size, image_size)
            and len(paths) == images.shape[0]
            and all(isinstance(p, str) for p in paths)
            and all(isinstance(k, str) and isinstance(v, int) for k, v in skipped.items())
        )
    except (KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        logger.debug("Malformed cache file %s", path)
        return None, True
    return _Faces(images, paths, skipped), False


def _write_cache(path: Path, faces: _Faces, fingerprint: str, settings: dict) -> None:
    """Write atomically (no fsync: a damaged cache file is recomputed)."""
    entry = {
        "settings": settings,
        "fingerprint": fingerprint,
        "images": faces.images.contiguous(),
        "paths": faces.paths,
        "skipped": faces.skipped,
    }
    atomic_torch_save(path, entry, durable=False)


def _progress_bar(total: int, description: str):
    """A rich progress bar on stderr with one task (``task_id`` 0) and its rate in faces/s, not yet started."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} faces/s" if speed else "- faces/s", style="progress.data.speed")

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.add_task(description, total=total)
    return bar


# --------------------------------------------------------------------------------------------------
# Preparing faces in worker processes
# --------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    """Worker processes for face preparation when the caller does not say: ``$FACEFL_PREP_WORKERS``, else every core
    this process may run on; 1 inside a Ray task or actor (as many as the CPUs it holds) and in a daemonic process
    (which may not start children)."""
    env = os.environ.get(PREP_WORKERS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{PREP_WORKERS_ENV} must be a positive integer (1 = no worker processes), got {env!r}.")
        return int(env)
    return available_cores()


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        return _default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer (1 = compute in this process), got {workers!r}.")
    if workers > 1 and multiprocessing.current_process().daemon:
        logger.debug("A daemonic process cannot start worker processes; preparing faces in-process.")
        return 1
    return workers


# The detector of a worker process, built on its first chunk and kept for the next ones.
_WORKER_DETECTORS: dict[tuple, Callable] = {}


def _worker_detector(mode: str, image_size: int, root: Path) -> Callable:
    key = (mode, image_size, tuple(sorted(_dlib_chipper_options(root).items())) if mode == "dlib" else ())
    if key not in _WORKER_DETECTORS:
        _WORKER_DETECTORS[key] = _make_detector(mode, image_size, root)
    return _WORKER_DETECTORS[key]


def _prepare_chunk(root: str, identity: str, files: list[str], mode: str,
                   image_size: int) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Worker side: the faces of some of an identity's files (numpy: pickled as plain bytes, no shared memory)."""
    path = Path(root)
    faces = _compute_identity(path, identity, files, mode, image_size,
                              lambda: _worker_detector(mode, image_size, path))
    return faces.images.numpy(), faces.paths, faces.skipped


def _chunk_size(total: int, workers: int) -> int:
    """Photos per task: about 8 tasks per worker so that the last ones end together, 4 to 32 photos each."""
    return max(4, min(32, math.ceil(total / (8 * workers))))


def _merge_chunks(parts: list[tuple[np.ndarray, list[str], dict[str, int]]], image_size: int) -> _Faces:
    """One identity's faces from its chunks' results, in file order (as :func:`_compute_identity` gives them)."""
    arrays = [images for images, _, _ in parts if len(images)]
    paths = [p for _, chunk_paths, _ in parts for p in chunk_paths]
    skipped: Counter[str] = Counter()
    for _, _, chunk_skipped in parts:
        skipped.update(chunk_skipped)
    images = (torch.from_numpy(np.concatenate(arrays)) if arrays
              else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8))
    return _Faces(images, paths, dict(skipped))


def _compute_in_pool(root: Path, todo: list[tuple[str, _Scan]], mode: str, image_size: int, workers: int,
                     done: Callable[[str, _Faces], None], advance: Callable[[int], None]) -> int:
    """Compute the faces of ``todo`` in ``workers`` processes; ``done(name, faces)`` is called (in this process) as
    soon as an identity is complete, ``advance(photos)`` as each chunk comes in.

    An identity's files are split into chunks, handed out in order, so that a large identity is shared by all the
    workers and no worker is left alone with one at the end. Returns the number of worker processes."""
    total = sum(len(scan.images) for _, scan in todo)
    size = _chunk_size(total, workers)
    tasks: list[tuple[str, int, list[str]]] = []
    parts: dict[str, list] = {}
    for name, scan in todo:
        chunks = [scan.images[i : i + size] for i in range(0, len(scan.images), size)]
        parts[name] = [None] * len(chunks)
        tasks.extend((name, i, files) for i, files in enumerate(chunks))
    for name, scan in todo:
        if not scan.images:  # nothing to compute: an empty result, cached like any other
            done(name, _merge_chunks([], image_size))
    remaining = {name: len(chunks) for name, chunks in parts.items()}
    workers = max(1, min(workers, len(tasks)))
    executor = start_pool(workers, preload=[__name__])
    try:
        try:  # the workers start here
            pending: dict[Future, tuple[str, int, int]] = {
                executor.submit(_prepare_chunk, str(root), name, files, mode, image_size): (name, i, len(files))
                for name, i, files in tasks
            }
        except (OSError, EOFError, RuntimeError) as exc:
            raise PreparationError(
                f"Cannot start the face-preparation worker processes: {type(exc).__name__}: {exc} (a script that "
                "calls load_faces needs the `if __name__ == \"__main__\":` guard; or run with workers=1, "
                f"`--workers 1` or {PREP_WORKERS_ENV}=1)."
            ) from exc
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: pending[f][:2]):
                name, index, count = pending.pop(future)
                try:
                    parts[name][index] = future.result()
                except BrokenProcessPool as exc:
                    raise PreparationError(
                        f"A face-preparation worker process died ({exc}); the identities finished so far are "
                        f"cached. Run again with one process (workers=1, `facefl data prepare --workers 1` or "
                        f"{PREP_WORKERS_ENV}=1) to see the error, e.g. a broken dlib or torch install."
                    ) from exc
                except Exception as exc:  # noqa: BLE001  (the worker's own error, re-raised here with its traceback)
                    raise PreparationError(
                        f"Face preparation failed in a worker process on {root / name}: {type(exc).__name__}: "
                        f"{exc} (fix the install, or run with workers=1 / `--workers 1` / {PREP_WORKERS_ENV}=1 "
                        f"to debug it in one process)."
                    ) from exc
                remaining[name] -= 1
                if not remaining[name]:
                    done(name, _merge_chunks(parts.pop(name), image_size))
                advance(count)
    except BaseException:  # a failure, Ctrl-C (KeyboardInterrupt) or a cache-write error: stop the workers now
        stop_pool(executor)
        raise
    executor.shutdown(wait=True)
    return workers


def _summary(skipped: dict[str, int], min_images: int) -> str:
    words = {
        "unreadable": "unreadable files",
        "not-an-image": "non-image files",
        "no-face": "images without a detected face",
        "too-few-images": f"identities with fewer than {min_images} usable images",
        "missing-identity": "requested identities not found",
    }
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in skipped.items())


def load_faces(
    root: str | os.PathLike,
    *,
    image_size: int = 64,
    mode: str = "auto",
    identities: Iterable[str] | None = None,
    min_images: int = 2,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
    stats: PrepStats | None = None,
) -> FaceSet:
    """Load an identity-folder dataset as square RGB face crops, using and filling the face cache.

    Parameters
    ----------
    root : path
        Dataset root with one folder per identity (``root/<identity>/<image>``).
    image_size : int, default 64
        Side ``S`` of the square crops.
    mode : {"auto", "crop", "detect", "dlib", "aligned"}, default "auto"
        ``"crop"``: centre crop (aligned sets); ``"detect"``: MTCNN + 5-point alignment (raw photos);
        ``"dlib"``: dlib's detector, 5-point shape predictor and face chip (padding 0.25), the input of dlib's
        face ResNet (``image_size`` 150; see ``common.data.dlib_chips``); ``"aligned"``: the central
        ``ALIGNED_CROP_FRACTION`` of those chips resized to ``image_size`` (they are computed, and cached, at 150
        pixels); ``"auto"``: ``"crop"`` for an LFW root, ``"detect"`` otherwise.
    identities : iterable of str, optional
        Load only these identity folders. Names without a folder are counted as ``"missing-identity"``.
    min_images : int, default 2
        Identities with fewer usable images are dropped and counted as ``"too-few-images"``.
    cache_dir : path, optional
        Cache location; default ``$FACEFL_CACHE`` or ``~/.cache/facefl``. Files live at
        ``<cache_dir>/<sha1(abs root)[:16]>/<mode>-<size>/<identity>.pt``. An unwritable cache is warned
        about and loading goes on without it.
    progress : bool, default True
        Show a progress bar (stderr, with the rate in faces/s) while faces are being computed.
    workers : int, optional
        Processes that compute the faces missing from the cache: default ``$FACEFL_PREP_WORKERS``, else every core
        this process may run on (1 inside a Ray task or actor holding 1 CPU); ``1`` computes them in this process,
        as does a call with so few photos to compute that starting the workers would cost more than they save
        (see ``POOL_START_SECONDS``; e.g. fewer than ~170 dlib chips on 2 cores). The workers start from a
        fresh interpreter (multiprocessing's fork server), which imports the main module: a script that calls this
        needs the ``if __name__ == "__main__":`` guard. Each identity is cached as soon
        as it is complete, so an interrupted preparation keeps what it finished and a rerun computes only the rest.
        The faces are the same whatever the number of workers.
    stats : PrepStats, optional
        Filled in with what was computed rather than read from the cache, the workers and the time it took.

    Returns
    -------
    FaceSet
        Identities sorted by name and labelled 0..K-1 in that order; images uint8 ``[N, 3, S, S]``;
        paths relative to ``root``. ``skipped`` counts, by reason, only reasons that occurred:
        ``"unreadable"`` and ``"not-an-image"`` (files), ``"no-face"`` (images, detect mode),
        ``"too-few-images"`` and ``"missing-identity"`` (identities).

    Raises
    ------
    DataError
        When ``root`` is missing or not a directory, or no usable image is left.
    PreparationError
        (a DataError) When a worker process fails or dies (e.g. a broken dlib install).
    """
    root = _check_root(root)
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer of at least 8 pixels, got {image_size!r}.")
    if not isinstance(min_images, int) or min_images < 1:
        raise ValueError(f"min_images must be a positive integer, got {min_images!r}.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer (1 = compute in this process), got {workers!r}.")
    mode = resolve_mode(mode, root)
    if mode == "aligned":
        chips = load_faces(root, image_size=DLIB_CHIP_SIZE, mode="dlib", identities=identities,
                           min_images=min_images, cache_dir=cache_dir, progress=progress, workers=workers,
                           stats=stats)
        return dataclasses.replace(chips, images=tighter_resized(chips.images, ALIGNED_CROP_FRACTION, image_size))

    skipped: Counter[str] = Counter()
    available = list_identities(root)
    if identities is None:
        names = available
    else:
        wanted = sorted(set(identities))
        present = set(available)
        names = [n for n in wanted if n in present]
        skipped["missing-identity"] = len(wanted) - len(names)

    settings = _cache_settings(mode, image_size, root)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_folder = cache_root / hashlib.sha1(str(root.resolve()).encode("utf-8")).hexdigest()[:16]
    cache_folder = cache_folder / f"{mode}-{image_size}"

    loaded: dict[str, _Faces] = {}
    todo: list[tuple[str, _Scan]] = []
    corrupt = 0
    for name in names:
        scan = _scan_identity(root / name)
        skipped["not-an-image"] += scan.non_images
        faces, was_corrupt = _read_cache(cache_folder / f"{name}.pt", scan.fingerprint, settings, image_size)
        corrupt += was_corrupt
        if faces is None:
            todo.append((name, scan))
        else:
            loaded[name] = faces

    if todo:
        cache_ok = True

        def done(name: str, faces: _Faces, scan: _Scan) -> None:
            """Keep an identity's faces and cache them at once, so that an interrupted run keeps them."""
            nonlocal cache_ok
            loaded[name] = faces
            if cache_ok:
                try:
                    _write_cache(cache_folder / f"{name}.pt", faces, scan.fingerprint, settings)
                except OSError as exc:
                    cache_ok = False
                    logger.warning(
                        "Cannot write the face cache in %s: %s (set FACEFL_CACHE to a writable folder); "
                        "continuing without a cache.",
                        cache_folder,
                        exc,
                    )

        total = sum(len(scan.images) for _, scan in todo)
        workers = _resolve_workers(workers)
        if total * PHOTO_SECONDS.get(mode, 0.1) * (1 - 1 / workers) <= POOL_START_SECONDS:
            workers = 1  # little to do: faster in this process than with workers to start
        started = time.perf_counter()
        bar = _progress_bar(total, f"Preparing faces ({mode}, {image_size}px)") if progress else None

        def advance(count: int) -> None:
            if bar is not None:
                bar.advance(bar.tasks[0].id, count)

        with bar if bar is not None else contextlib.nullcontext():
            if workers > 1:
                scans = dict(todo)
                logger.debug("Preparing %d photos of %d identities in %d worker processes.", total, len(todo), workers)
                workers = _compute_in_pool(root, todo, mode, image_size, workers,
                                           lambda name, faces: done(name, faces, scans[name]), advance)
            else:
                aligner_box: list[Callable] = []

                def aligner() -> Callable:  # created on first use: MTCNN (or dlib's predictor) takes a moment
                    if not aligner_box:
                        aligner_box.append(_make_detector(mode, image_size, root))
                    return aligner_box[0]

                for name, scan in todo:
                    done(name, _compute_identity(root, name, scan.images, mode, image_size, aligner,
                                                 on_photo=(lambda: advance(1)) if bar is not None else None), scan)
        if stats is not None:
            stats.photos, stats.identities, stats.workers = total, len(todo), workers
            stats.seconds = time.perf_counter() - started
    if stats is not None:
        stats.cached_identities = len(names) - len(todo)
    if corrupt:
        logger.warning("Recomputed %d corrupt face-cache files in %s.", corrupt, cache_folder)

    kept_names: list[str] = []
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    paths: list[str] = []
    for name in names:
        faces = loaded[name]
        skipped.update(faces.skipped)
        if len(faces.paths) < min_images:
            skipped["too-few-images"] += 1
            continue
        labels.append(np.full(len(faces.paths), len(kept_names), dtype=np.int64))
        kept_names.append(name)
        images.append(faces.images.numpy())
        paths.extend(faces.paths)

    skipped_counts = {k: v for k, v in skipped.items() if v}
    if not paths:
        detail = f"; skipped: {_summary(skipped_counts, min_images)}" if skipped_counts else ""
        raise DataError(
            f"No usable face images in {root} ({len(names)} identity folders{detail}). Each identity folder "
            f"needs at least {min_images} readable .jpg/.jpeg/.png/.pgm images ({_DATA_HINT})."
        )
    if skipped_counts:
        logger.warning(
            "Loaded %d images of %d identities from %s; skipped %s.",
            len(paths),
            len(kept_names),
            root,
            _summary(skipped_counts, min_images),
        )
    return FaceSet(
        # numpy, not torch.cat: thousands of small tensors concatenate ~50x faster this way on a busy CPU
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        identities=tuple(kept_names),
        paths=tuple(paths),
        skipped=skipped_counts,
    )


def load_lfw_pairs(
    root: str | os.PathLike,
    pairs_file: str | os.PathLike = "pairsDevTest.txt",
    *,
    image_size: int = 64,
    mode: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    max_pairs: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load the face crops of an LFW pairs file, through the same cache as :func:`load_faces`.

    Parameters
    ----------
    root : path
        The LFW root.
    pairs_file : path, default "pairsDevTest.txt"
        Relative to ``root`` unless absolute.
    image_size, mode, cache_dir, progress
        As in :func:`load_faces`.
    max_pairs : int, default 0
        0 keeps every pair; otherwise a deterministic balanced subset: the first ``ceil(max_pairs / 2)``
        matched and the first ``max_pairs // 2`` mismatched pairs, in file order.

    Returns
    -------
    images_a, images_b : torch.Tensor
        uint8 ``[P, 3, S, S]``.
    same : torch.Tensor
        bool ``[P]``, True for matched pairs.
        Pairs whose images are missing or unreadable are dropped with a WARNING.

    Raises
    ------
    DataError
        When the root or pairs file is missing or malformed, or no pair is usable.
    """
    root = _check_root(root)
    if not isinstance(max_pairs, int) or max_pairs < 0:
        raise ValueError(f"max_pairs must be a non-negative integer (0 = all), got {max_pairs!r}.")
    pairs_path = Path(pairs_file) if Path(pairs_file).is_absolute() else root / pairs_file
    pairs = read_pairs_file(pairs_path)
    if max_pairs:
        matched = [p for p in pairs if p.same][: max_pairs - max_pairs // 2]
        mismatched = [p for p in pairs if not p.same][: max_pairs // 2]
        chosen = {id(p) for p in matched + mismatched}
        pairs = [p for p in pairs if id(p) in chosen]
    names = sorted({p.name_a for p in pairs} | {p.name_b for p in pairs})
    faces = load_faces(
        root,
        image_size=image_size,
        mode=mode,
        identities=names,
        min_images=1,
        cache_dir=cache_dir,
        progress=progress,
    )
    index = {path: i for i, path in enumerate(faces.paths)}
    usable = [p for p in pairs if p.relpath_a in index and p.relpath_b in index]
    if not usable:
        raise DataError(f"No pair of {pairs_path} has both images readable under {root} (pass --data the LFW root).")
    if len(usable) < len(pairs):
        logger.warning(
            "Dropped %d of %d pairs of %s whose images are missing or unreadable.",
            len(pairs) - len(usable),
            len(pairs),
            pairs_path,
        )
    idx_a = torch.tensor([index[p.relpath_a] for p in usable], dtype=torch.long)
    idx_b = torch.tensor([index[p.relpath_b] for p in usable], dtype=torch.long)
    same = torch.tensor([p.same for p in usable], dtype=torch.bool)
    return faces.images[idx_a], faces.images[idx_b], same
