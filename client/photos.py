"""``facefl anonymize``: stylize the faces in image files and folders on this device, never touching the inputs.

Each output is written atomically; EXIF orientation is applied first (phone photos) and no metadata (GPS, camera,
EXIF) is copied to the output. With verification on (the default), every image goes through the egress gate: a
face that dlib still matches to its original after anonymization is not written.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


def anonymize_files(paths: list[str], out_dir: str | os.PathLike, *, anonymizer: Anonymizer, gate=None,
                    report: Callable[[FileOutcome], None] | None = None) -> dict:
    """Anonymize every image in ``paths`` into ``out_dir``; returns a summary (also written as
    ``out_dir/anonymize-report.json``). With ``gate`` (an :class:`common.anonymization.egress.EgressGate`), images are
    released through it and a face still matched is refused instead of written."""
    from common.anonymization.egress import EgressRefused

    out = Path(out_dir).expanduser()
    pairs, problems = collect_inputs(paths)
    if not pairs and not problems:
        raise FileNotFoundError(f"No images found in {', '.join(paths)} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    sources = {src.resolve() for src, _ in pairs}
    out_resolved = out.resolve()
    outcomes: list[FileOutcome] = [FileOutcome(src, None, "error", msg) for src, msg in problems]
    if report is not None:
        for o in outcomes:
            report(o)
    for src, rel in pairs:
        target = out_resolved / rel
        if target.resolve() in sources or target.with_suffix(".png").resolve() in sources:
            outcomes.append(FileOutcome(str(src), None, "error", "output would overwrite an input; choose another --out"))
            if report is not None:
                report(outcomes[-1])
            continue
        outcomes.append(_one(src, target, anonymizer, gate, EgressRefused))
        if report is not None:
            report(outcomes[-1])
    summary = {
        "images": len(outcomes),
        "anonymized": sum(o.status in ("anonymized", "whole-image") for o in outcomes),
        "faces": sum(len(o.faces) for o in outcomes),
        "no-face (whole image stylized)": sum(o.status == "whole-image" for o in outcomes),
        "refused": sum(o.status == "refused" for o in outcomes),
        "errors": sum(o.status == "error" for o in outcomes),
        "files": [o.__dict__ for o in outcomes],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "anonymize-report.json", summary)
    return summary


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


def _one(src: Path, target: Path, anonymizer: Anonymizer, gate, refused_exc) -> FileOutcome:
    img = _open(src)
    if isinstance(img, str):
        return FileOutcome(str(src), None, "error", img)
    if gate is not None:
        try:
            released = gate.release(img, purpose=f"anonymize {src.name}")
        except refused_exc as exc:
            return FileOutcome(str(src), None, "refused", str(exc))
        result = released.result
        out_img = result.image
    else:
        result = anonymizer(img)
        if result.refused:
            return FileOutcome(str(src), None, "refused", result.message)
        out_img = result.image
    data, suffix = _encode(out_img, target.suffix)
    final = target.with_suffix(suffix)
    atomic_write_bytes(final, data, durable=False)
    status = "whole-image" if result.action == "whole-image" else "anonymized"
    return FileOutcome(str(src), str(final), status, result.message, [f.to_dict() for f in result.faces])


def summary_line(summary: dict) -> str:
    return (f"{summary['images']} images: {summary['anonymized']} written ({summary['faces']} faces; "
            f"{summary['no-face (whole image stylized)']} with no face found, stylized whole), "
            f"{summary['refused']} refused, {summary['errors']} errors")
