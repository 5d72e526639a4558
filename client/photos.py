"""``facefl anonymize``: stylize the faces in image files and folders on this device, never touching the inputs.

Each output is written atomically; EXIF orientation is applied first (phone photos) and no metadata (GPS, camera,
EXIF) is copied to the output. With verification on (the default), every image goes through the egress gate: a
face that dlib still matches to its original after anonymization is not written.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.anonymization.anonymizer import Anonymizer
from common.atomic import atomic_write_bytes, atomic_write_json
from common.data.datasets import IMAGE_EXTENSIONS

# Decompression-bomb guard: larger images are refused with a message instead of exhausting memory.
MAX_PIXELS = 120_000_000


@dataclass
class FileOutcome:
    source: str
    output: str | None
    status: str  # "anonymized" | "whole-image" | "refused" | "error"
    message: str
    faces: list = field(default_factory=list)
    reason: str | None = None  # a refusal's reason (common.anonymization.egress.REASONS key, or "no-face")
    matched: str | None = None  # the photo a refused face matched (its path), when the gate named one
    distance: float | None = None  # and the recognizer's distance to it
    attempt: str | None = None  # which of the gate's attempts was written ("default", "second pass", a fallback)


def collect_inputs(paths: list[str]) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Expand files and folders into ``(source, relative output path)`` pairs; returns them and problems found.

    A folder keeps its structure under its own name; files with other extensions inside folders are ignored."""
    pairs, problems = [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                    pairs.append((f, Path(p.resolve().name) / f.relative_to(p)))
        elif p.is_file():
            pairs.append((p, Path(p.name)))
        else:
            problems.append((raw, "no such file or folder"))
    return pairs, problems


def _encode(img: Image.Image, suffix: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    suffix = suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        img.save(buf, format="JPEG", quality=95)
    elif suffix == ".webp":
        img.save(buf, format="WEBP", quality=95)
    else:
        img.save(buf, format="PNG")
        suffix = ".png"
    return buf.getvalue(), suffix


# Photos per worker below which a pool costs more than it saves (its start: ~5 s to import torch, MTCNN and dlib and
# load the stylizers; a 250x250 photo: ~0.5 s of one core through the gate).
PHOTOS_PER_WORKER = 12


def anonymize_files(paths: list[str], out_dir: str | os.PathLike, *, anonymizer: Anonymizer | None = None,
                    gate=None, gallery: list[str] = (), check_inputs: bool = False, workers: int = 1,
                    build: Callable[[], tuple] | None = None, verify: bool | None = None,
                    report: Callable[[FileOutcome], None] | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Anonymize every image in ``paths`` into ``out_dir``; returns a summary (also written as
    ``out_dir/anonymize-report.json``).

    With ``gate`` (an :class:`common.anonymization.egress.EgressGate`), images are released through it and a face
    still matched is refused instead of written. Its gallery gets the faces of the ``gallery`` photos (files or
    folders) and, with ``check_inputs``, of every input: all of them are detected and described once, before any
    is anonymized, and each input's faces are reused when it is anonymized.

    ``workers`` > 1 spreads the photos over that many processes (fewer for a small folder), each with the anonymizer
    and gate that ``build()`` returns (a picklable callable, e.g. a ``functools.partial``: ``(anonymizer, gate)``,
    gate None for no verification; ``verify`` says which it returns). ``progress(stage, done, total)`` is called as photos finish ("describe",
    "anonymize"); ``report(outcome)`` as each file's outcome is known."""
    from common.anonymization.egress import REASONS

    started = time.perf_counter()
    out = Path(out_dir).expanduser()
    pairs, problems = collect_inputs(paths)
    gallery_pairs, gallery_problems = collect_inputs(list(gallery))
    if not pairs and not problems:
        raise FileNotFoundError(f"No images found in {', '.join(paths)} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if gallery_problems:
        raise FileNotFoundError(f"Gallery photos not found: {', '.join(p for p, _ in gallery_problems)}.")
    sources = {src.resolve() for src, _ in pairs}
    out_resolved = out.resolve()
    outcomes: list[FileOutcome] = [FileOutcome(src, None, "error", msg) for src, msg in problems]
    if report is not None:
        for o in outcomes:
            report(o)
    todo: list[tuple[Path, Path]] = []
    for src, rel in pairs:
        target = out_resolved / rel
        if target.resolve() in sources or target.with_suffix(".png").resolve() in sources:
            outcomes.append(FileOutcome(str(src), None, "error", "output would overwrite an input; choose another --out"))
            if report is not None:
                report(outcomes[-1])
            continue
        todo.append((src, target))
    workers = max(1, min(int(workers), math.ceil(len(todo) / PHOTOS_PER_WORKER))) if build is not None else 1
    verify = gate is not None if verify is None else bool(verify)
    described: dict[str, object] = {}
    gallery_faces = 0
    with _Workers(workers, build, anonymizer, gate) as pool:
        if verify:
            to_describe = [src for src, _ in gallery_pairs] + ([src for src, _ in todo] if check_inputs else [])
            unique = list(dict.fromkeys(str(p) for p in to_describe))
            for i, (path, detection) in enumerate(pool.map(_describe_task, unique)):
                described[path] = detection
                if progress is not None:
                    progress("describe", i + 1, len(unique))
            descriptors, labels = [], []
            for path, detection in described.items():
                if not isinstance(detection, str):
                    descriptors += list(detection.descriptors)
                    labels += [path] * len(detection.descriptors)
            gallery_faces = pool.set_gallery(descriptors, labels)
        tasks = [(str(src), str(target), described.get(str(src)), pool.gallery) for src, target in todo]
        finished = []
        for i, outcome in enumerate(pool.map(_anonymize_task, tasks)):
            finished.append(outcome)
            if report is not None:
                report(outcome)
            if progress is not None:
                progress("anonymize", i + 1, len(tasks))
        order = {task[0]: i for i, task in enumerate(tasks)}
        outcomes += sorted(finished, key=lambda o: order.get(o.source, len(order)))
    refused = [o for o in outcomes if o.status == "refused"]
    summary = {
        "images": len(outcomes),
        "anonymized": sum(o.status in ("anonymized", "whole-image") for o in outcomes),
        "faces": sum(len(o.faces) for o in outcomes),
        "no-face (whole image stylized)": sum(o.status == "whole-image" for o in outcomes),
        "refused": len(refused),
        "refusals": {reason: n for reason in [*REASONS, None]
                     if (n := sum(o.reason == reason for o in refused))},
        "retried": sum(o.attempt not in (None, "default") for o in outcomes),
        "errors": sum(o.status == "error" for o in outcomes),
        "gallery faces": gallery_faces,
        "workers": workers,
        "seconds": round(time.perf_counter() - started, 1),
        "files": [o.__dict__ for o in outcomes],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "anonymize-report.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ worker side
# The anonymizer and gate of this process: set by _Workers in this process, or by _init_worker in a pool's worker.
_STATE: dict = {}


def _init_worker(build: Callable[[], tuple]) -> None:
    _STATE["anonymizer"], _STATE["gate"] = build()


def _use_gallery(gallery: str | None) -> None:
    """Load the gallery file ``gallery`` (see :meth:`_Workers.set_gallery`) into this process's gate, once."""
    gate = _STATE.get("gate")
    if gate is None or gallery is None or _STATE.get("gallery") == gallery:
        return
    with np.load(gallery, allow_pickle=False) as saved:
        descriptors, labels = saved["descriptors"], [str(label) for label in saved["labels"]]
    gate._gallery.clear()
    gate._labels.clear()
    gate.add_descriptors(list(descriptors), labels)
    _STATE["gallery"] = gallery


def _describe_task(path: str):
    """The faces of one photo, detected and described (a :class:`Detection`), or why it cannot be read."""
    img = _open(Path(path))
    if isinstance(img, str):
        return path, img
    return path, _STATE["gate"].anonymizer.describe(img)


def _anonymize_task(task) -> FileOutcome:
    src, target, detection, gallery = task
    try:
        _use_gallery(gallery)
        return _one(Path(src), Path(target), _STATE["anonymizer"], _STATE["gate"],
                    None if isinstance(detection, str) else detection)
    except Exception as exc:  # noqa: BLE001  (one bad photo is counted, the others go on)
        return FileOutcome(src, None, "error", f"{type(exc).__name__}: {exc}")


class _Workers:
    """The anonymizer and gate in this process (one worker) or in a pool of processes with the same gallery."""

    def __init__(self, workers: int, build, anonymizer, gate) -> None:
        self.workers, self.build = workers, build
        self.executor = self.folder = self.gallery = None
        if workers == 1:
            if anonymizer is None and gate is None and build is not None:
                anonymizer, gate = build()
            if anonymizer is None and gate is not None:
                anonymizer = gate.anonymizer
            if anonymizer is None:
                raise ValueError("anonymize_files needs an anonymizer, a gate or build.")
            self.local = (anonymizer, gate)

    def __enter__(self):
        if self.workers == 1:
            self.saved = dict(_STATE)
            _STATE["anonymizer"], _STATE["gate"] = self.local
        else:
            from common.worker_pool import start_pool

            self.executor = start_pool(self.workers, preload=[__name__], initializer=_init_worker,
                                       initargs=(self.build,))
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.executor is None:
            _STATE.clear()
            _STATE.update(self.saved)
        else:
            from common.worker_pool import stop_pool

            if kind is None:
                self.executor.shutdown(wait=True)
            else:  # a failure or Ctrl-C: stop the workers now
                stop_pool(self.executor)
        if self.folder is not None:
            self.folder.cleanup()

    def set_gallery(self, descriptors, labels) -> int:
        """Give every worker's gate the gallery: written once to a file in a temporary folder, which each worker
        reads before its first photo. Returns the number of faces."""
        descriptors = [d for d in descriptors if d is not None]
        if self.executor is None:
            gate = self.local[1]
            return gate.add_descriptors(descriptors, labels) if gate is not None else 0
        self.folder = tempfile.TemporaryDirectory(prefix="facefl-gallery-")
        self.gallery = str(Path(self.folder.name) / "gallery.npz")
        np.savez(self.gallery, descriptors=np.asarray(descriptors, np.float64).reshape(-1, 128),
                 labels=np.asarray(labels, dtype=str))
        return len(descriptors)

    def map(self, fn, items):
        """``fn`` over ``items``, results as they finish (in any order) in a pool, in order in this process."""
        if self.executor is None:
            for item in items:
                yield fn(item)
            return
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        futures = [self.executor.submit(fn, item) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(f"An anonymization worker process died ({exc}); run with --workers 1 to see the "
                               "error (for example a broken dlib or torch install).") from exc


def _open(src: Path) -> Image.Image | str:
    """The photo, upright (EXIF orientation applied), or a one-line reason it cannot be used."""
    try:
        with Image.open(src) as img:
            if img.width * img.height > MAX_PIXELS:
                return (f"image too large ({img.width}x{img.height} pixels, limit {MAX_PIXELS:,}); "
                        "downscale it first")
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        return f"not a readable image ({str(exc).splitlines()[0]})"


def read_image(src: str | os.PathLike) -> Image.Image | None:
    """The photo at ``src`` as :func:`anonymize_files` reads it, or None when it cannot be used."""
    img = _open(Path(src))
    return img if isinstance(img, Image.Image) else None


def _one(src: Path, target: Path, anonymizer: Anonymizer, gate, detection=None) -> FileOutcome:
    from common.anonymization.egress import EgressRefused

    img = _open(src)
    if isinstance(img, str):
        return FileOutcome(str(src), None, "error", img)
    attempt = None
    if gate is not None:
        try:
            released = gate.release(img, purpose=f"anonymize {src.name}", faces=detection)
        except EgressRefused as exc:
            refusal = exc.refusal
            return FileOutcome(str(src), None, "refused", str(exc), reason=refusal and refusal.reason,
                               matched=refusal and refusal.matched, distance=refusal and refusal.distance)
        result, attempt = released.result, released.attempt
        out_img = result.image
    else:
        result = anonymizer(img, faces=detection)
        if result.refused:
            return FileOutcome(str(src), None, "refused", result.message, reason="no-face")
        out_img = result.image
    data, suffix = _encode(out_img, target.suffix)
    final = target.with_suffix(suffix)
    atomic_write_bytes(final, data, durable=False)
    status = "whole-image" if result.action == "whole-image" else "anonymized"
    return FileOutcome(str(src), str(final), status, result.message, [f.to_dict() for f in result.faces],
                       attempt=attempt)


def summary_line(summary: dict) -> str:
    from common.anonymization.egress import REASONS

    why = summary.get("refusals") or {}
    reasons = "; ".join(f"{n} {REASONS.get(reason, 'other')}" for reason, n in why.items())
    retried = summary.get("retried", 0)
    return (f"{summary['images']} images: {summary['anonymized']} written ({summary['faces']} faces; "
            f"{summary['no-face (whole image stylized)']} with no face found, stylized whole"
            f"{f'; {retried} after a retry' if retried else ''}), "
            f"{summary['refused']} refused{f' ({reasons})' if reasons else ''}, {summary['errors']} errors")
