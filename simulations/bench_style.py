"""``facefl bench anonymize``: does style transfer anonymize better than blur and pixelation, and how fast is it?

1. Speed on this machine's CPU: faces/s of the fast stylizer (half and full width) on 128x128 face regions,
   batch 1 and 8; images/s end to end (MTCNN detection, stylization, feathered blend) on 640x480 photos.
2. Re-identification by an independent recognizer (dlib's ResNet descriptor, never seen by the stylizer) on LFW
   ``pairsDevTest.txt`` people: image 1 of each person is anonymized and compared with their original image 2
   (match rate at dlib's 0.6 threshold, top-1 identification in a gallery of everyone's image 2), with MTCNN
   detection retention and landmark displacement (x inter-ocular distance). Side by side: no change, whole-image
   Gaussian blur and pixelation (the reference points), the same filters on the face region only, and the
   stylizer at several strengths (the privacy/fidelity curve); Gatys optimisation on a subset when asked.

Everything printed is also written to ``<out>/bench-anonymize.json``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

from common.anonymization.anonymizer import Anonymizer, BlurFilter, PixelateFilter
from common.anonymization.stylizer import StyleNet
from common.atomic import atomic_write_json


def stylizer_speed(model: torch.nn.Module, *, size: int = 128, batch: int = 1, repeats: int = 10) -> float:
    """Median faces/s of ``model`` on ``batch`` random ``size`` x ``size`` regions (inference mode)."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def photos_640x480(faces_dir: Path) -> list[Image.Image]:
    """The test photos, fitted (cropped and resized) to 640x480 landscape."""
    out = []
    for p in sorted(faces_dir.glob("*.jpg")):
        with Image.open(p) as img:
            out.append(ImageOps.fit(ImageOps.exif_transpose(img).convert("RGB"), (640, 480),
                                    Image.Resampling.BILINEAR))
    return out


def end_to_end_speed(anonymizer: Anonymizer, photos: list[Image.Image], repeats: int = 3) -> dict:
    faces = 0
    anonymizer(photos[0])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for img in photos:
            faces += len(anonymizer(img).faces)
    elapsed = time.perf_counter() - start
    n = repeats * len(photos)
    return {"images": n, "images_per_s": n / elapsed, "faces_per_image": faces / n}


def prior_and_style_speed(model: torch.nn.Module, *, size: int = 128, batch: int = 8, repeats: int = 5) -> float:
    """Median faces/s of a whole face's anonymization at ``size`` x ``size``: the face prior painted on its
    landmarks (when the stylizer has one), then the stylizer, ``batch`` faces per forward pass."""
    from common.anonymization.face_prior import FacePrior, prior_landmarks

    prior = getattr(model, "face_prior", None)
    painter = FacePrior(prior) if isinstance(prior, torch.Tensor) and prior.numel() else None
    regions = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    # landmarks of a face filling the middle 60% of the region, as the anonymizer's margin frames it
    points = (prior_landmarks(size) - size / 2) * 0.6 + size / 2

    def once() -> None:
        x = torch.stack([painter(r, points[None]) for r in regions]) if painter is not None else regions
        model(x)

    times = []
    with torch.inference_mode():
        once()
        for _ in range(repeats):
            t = time.perf_counter()
            once()
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def run_style_bench(*, data: str, people: int, style: str, strengths: list[float], gatys_people: int, out: Path,
                    console: Console, styles_dir: str | None = None, stylizers: list[str] | None = None,
                    heldout_people: int = 150) -> dict:
    from common.anonymization.recognizer import DlibRecognizer
    from common.anonymization.reid import (HogDetector, ReidBench, gaussian_blur, identity_transform, lfw_test_people,
                                           open_people, pixelate)
    from common.data.preprocess import FaceAligner
    from server.stylizers import ensure_stylizer, load_style_image, stylizer_anonymizer
    from simulations.bench_anonymize import print_table, reports_to_json, run_anonymize_bench

    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    from common.anonymization.styles import load_stylizer

    if stylizers:
        loaded = [(*load_stylizer(p), Path(p)) for p in stylizers]
    else:
        loaded = [ensure_stylizer(style, width="half", styles_dir=styles_dir, log=log)]
    model, meta, path = loaded[0]
    summary: dict = {"stylizers": [{"path": str(p), "style": m.get("style"), "training": m.get("settings"),
                                    "identity_model": m.get("identity_model"), "face_prior": m.get("face_prior"),
                                    "shipped": m.get("shipped", False),
                                    "final_losses": {k: v for k, v in m.get("history", {}).items()
                                                     if k.startswith("final_")}}
                                   for _, m, p in loaded], "torch_threads": torch.get_num_threads()}

    # 1. Speed.
    speed = {}
    for width, net in (("half", model), ("full", StyleNet("full").eval())):
        for batch in (1, 8):
            speed[f"{width}-batch{batch}_faces_per_s"] = stylizer_speed(net, batch=batch)
    speed["prior+stylizer-batch8_faces_per_s"] = prior_and_style_speed(model)
    detector = FaceAligner(min_score=0.6, max_detect_side=1024)
    faces_dir = Path(data).expanduser().resolve().parent / "faces"
    photos = photos_640x480(faces_dir) if faces_dir.is_dir() else []
    if photos:
        speed["end_to_end_640x480"] = end_to_end_speed(stylizer_anonymizer(model, meta, detector=detector), photos)
    summary["speed"] = speed
    table = Table(title=f"Stylizer speed ({torch.get_num_threads()} threads)")
    table.add_column("measure")
    table.add_column("value")
    for k, v in speed.items():
        table.add_row(k, f"{v:.1f}" if isinstance(v, float) else
                      f"{v['images_per_s']:.2f} images/s ({v['faces_per_image']:.2f} faces per image, {v['images']} images)")
    console.print(table)

    # 2. Re-identification.
    def anonymizer_transform(a: Anonymizer, strength: float | None = None):
        def transform(img: Image.Image):
            return a(img, strength=strength).image
        return transform

    style_anons = [(Path(p).stem, stylizer_anonymizer(m, mt, detector=detector)) for m, mt, p in loaded]
    style_anon = style_anons[0][1]
    transforms = [
        ("none", identity_transform),
        ("blur r8, whole image", gaussian_blur(8)),
        ("pixelate 16x16, whole image", pixelate(16)),
        ("blur, face region", anonymizer_transform(Anonymizer(BlurFilter(0.08), detector=detector))),
        ("pixelate 8x8, face region", anonymizer_transform(Anonymizer(PixelateFilter(8), detector=detector))),
    ]
    style_transforms = [(f"{label} s={s:g}", anonymizer_transform(anon, s))
                        for label, anon in style_anons for s in strengths]
    transforms += style_transforms
    # MTCNN under two threads on a busy 2-core machine slows down 50x; one thread is steady. Any MTCNN detection
    # counts as "still found" (the protocol of the reference figures).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reports = run_anonymize_bench(lfw_root=data, people=people, transforms=transforms, console=console,
                                      detect_min_score=0.0)
        summary["reid"] = reports_to_json(reports)
        # The privacy/utility curve of the first stylizer (strength against re-identification and detection), with
        # blur and pixelation as reference points, for the report's chart.
        by_name = {r.name: r for r in reports}
        summary["curve"] = {
            "stylizer": style_anons[0][0],
            "points": [{"strength": st, **{k: getattr(by_name[f"{style_anons[0][0]} s={st:g}"], k)
                                           for k in ("match_rate", "top1", "detection_rate", "hog_retention")}}
                       for st in strengths],
            "references": {name: {k: getattr(by_name[name], k) for k in ("match_rate", "detection_rate",
                                                                           "hog_retention")}
                           for name in ("blur r8, whole image", "pixelate 16x16, whole image")},
        }
        # 3. The same on people and photos the benchmark's 150 do not include (never seen by any stylizer either:
        # stylizers train on peopleDevTrain identities only).
        recognizer, hog = DlibRecognizer(), HogDetector()
        heldout_sets = []
        if heldout_people:
            heldout_sets.append((f"LFW test people {people + 1}-{people + heldout_people}",
                                 open_people(lfw_test_people(data, heldout_people, skip=people))))
        if faces_dir.is_dir():
            own = open_people([(p.stem, p, p) for p in sorted(faces_dir.glob("*.jpg"))])  # compared with itself
            heldout_sets.append((f"{faces_dir.name}/ photos, one each (match: to the source photo)", own))
        heldout = []
        for set_name, set_people in heldout_sets:
            bench = ReidBench(set_people, recognizer=recognizer, aligner=FaceAligner(min_score=0.0), hog=hog)
            rows = [bench.measure(identity_transform, f"{set_name}: none")]
            rows += [bench.measure(t, f"{set_name}: {label}") for label, t in style_transforms]
            heldout += rows
        if heldout:
            print_table(heldout, recognizer, 0.0, title="Held-out people and photos")
        summary["reid_heldout"] = reports_to_json(heldout)
    finally:
        torch.set_num_threads(threads)
    summary["recognizer"] = DlibRecognizer.name
    if gatys_people:
        from common.anonymization.anonymizer import GatysFilter

        work = int(meta.get("work_size", 128))
        gatys = stylizer_anonymizer(model, meta, detector=detector, region_filter=GatysFilter(
            load_style_image(meta["style_file"]), steps=150, work_size=work))
        g_reports = run_anonymize_bench(lfw_root=data, people=gatys_people, console=console, detect_min_score=0.0,
                                        transforms=[
            ("none", identity_transform), ("gatys s=1", anonymizer_transform(gatys)),
            (f"style s=1 (same {gatys_people} people)", anonymizer_transform(style_anon, 1.0))])
        summary["reid_gatys"] = reports_to_json(g_reports)
    atomic_write_json(out / "bench-anonymize.json", summary)
    console.print(f"written {out / 'bench-anonymize.json'}")
    return summary
