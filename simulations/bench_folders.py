"""``facefl bench anonymize`` folder rows: ``facefl anonymize`` itself, with its defaults, on folders of many people.

Each row runs :func:`client.photos.anonymize_files` exactly as the command does (the same pipeline, gate, gallery
of all inputs, workers on every core) on a folder of LFW photos, then judges what it wrote:

- "150 people" / "held-out 150": image 1 of each of 150 View-1 test people (``pairsDevTest.txt``; the held-out row
  is people 151-300, never used to choose the gate's rule), one photo per person. Judged like the stylizer rows
  (:class:`common.anonymization.reid.ReidBench`): dlib match and top-1 against each person's image 2, which is not
  in the folder; MTCNN still finds a face (of all the people, a withheld photo counting as not found); HOG.
- "1,000 people": the first photo of each of the first 1,000 ``peopleDevTest.txt`` people: the share written (the
  rate must not fall as the folder grows) and the time.
- "2-4 photos per person": every photo of ``peopleDevTest.txt`` people with 2 to 4 photos: no written face may be
  matched by dlib to another photo of its own person in the folder (the gate's purpose), and the share written.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.data.datasets import DataError

FOLDER_PARTS = ("150", "heldout-150", "1000", "multi")


def _link(folder: Path, files: list[Path]) -> None:
    folder.mkdir(parents=True)
    for f in files:
        os.symlink(f, folder / f.name)


def _people_file(root: Path, low: int = 1, high: int = 10**9) -> list[tuple[str, int]]:
    people = []
    for line in (root / "peopleDevTest.txt").read_text().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().isdigit() and low <= int(parts[1]) <= high:
            people.append((parts[0], int(parts[1])))
    return people


def _anonymize_folder(folder: Path, out: Path, *, workers: int, log) -> tuple[dict, float]:
    """``facefl anonymize FOLDER --out OUT`` with its defaults, through the function the command calls."""
    from client.photos import anonymize_files
    from server.stylizers import photo_pipeline

    options = dict(method="style", data=None)
    start = time.perf_counter()
    anonymizer, gate = photo_pipeline(verify=True, log=log, **options)
    summary = anonymize_files([str(folder)], out, anonymizer=anonymizer, gate=gate, check_inputs=True,
                              workers=workers, build=functools.partial(photo_pipeline, verify=True, **options),
                              verify=True)
    return summary, time.perf_counter() - start


def _written(summary: dict) -> dict[str, str]:
    return {Path(f["source"]).name: f["output"] for f in summary["files"] if f["output"]}


def run_folder_bench(*, data: str, out: Path, console: Console, parts=FOLDER_PARTS, workers: int = 0) -> list[dict]:
    """Run the folder rows named in ``parts``, print their table and return them (also in ``out/bench-folders.json``)."""
    from PIL import Image

    from common.anonymization.recognizer import DlibRecognizer
    from common.anonymization.reid import HogDetector, ReidBench, lfw_test_people, open_people, _main_face
    from common.atomic import atomic_write_json, json_safe
    from common.data.preprocess import FaceAligner
    from common.worker_pool import available_cores

    root = Path(data).expanduser()
    if not (root / "peopleDevTest.txt").is_file():
        raise DataError(f"{root} has no peopleDevTest.txt; pass --data the LFW root.")
    workers = workers or available_cores()
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    recognizer, aligner, hog = DlibRecognizer(), FaceAligner(min_score=0.0), HogDetector()
    rows = []
    with tempfile.TemporaryDirectory(prefix="facefl-bench-folders-") as tmp:
        tmp = Path(tmp)
        for part in parts:
            if part in ("150", "heldout-150"):
                skip = 0 if part == "150" else 150
                people = lfw_test_people(root, 150, skip=skip)
                folder = tmp / f"lfw-{part}"
                _link(folder, [Path(p1) for _, p1, _ in people])
                summary, seconds = _anonymize_folder(folder, tmp / f"out-{part}", workers=workers, log=log)
                written = _written(summary)
                bench = ReidBench(open_people(people), recognizer=recognizer, aligner=aligner, hog=hog)
                released = {}
                for name, p1, _ in people:
                    path = written.get(Path(p1).name)
                    if path is not None:
                        with Image.open(path) as img:
                            released[name] = img.convert("RGB")
                judged = bench.measure_released(released, part)
                label = "LFW test people 1-150" if part == "150" else "LFW test people 151-300 (held out)"
                rows.append({"folder": label, "photos": len(people), **_counts(summary), "seconds": seconds,
                             "judged people": len(bench), "dlib match": judged.match_rate, "top-1": judged.top1,
                             "MTCNN finds": judged.detection_rate, "HOG keeps": judged.hog_retention,
                             "own other photo matched": None})
            elif part == "1000":
                people = _people_file(root)[:1000]
                folder = tmp / "lfw-1000"
                _link(folder, [root / n / f"{n}_0001.jpg" for n, _ in people])
                summary, seconds = _anonymize_folder(folder, tmp / "out-1000", workers=workers, log=log)
                rows.append({"folder": "LFW test people, 1,000 (one photo each)", "photos": len(people),
                             **_counts(summary), "seconds": seconds})
            elif part == "multi":
                people = _people_file(root, 2, 4)[:100]
                files = [root / n / f"{n}_{i:04d}.jpg" for n, count in people for i in range(1, count + 1)]
                folder = tmp / "lfw-multi"
                _link(folder, files)
                summary, seconds = _anonymize_folder(folder, tmp / "out-multi", workers=workers, log=log)
                written = _written(summary)
                # Each photo's main face: the original's descriptor, and the written face's at the same box.
                originals, boxes = {}, {}
                for f in files:
                    with Image.open(f) as img:
                        rgb = img.convert("RGB")
                    face = _main_face(aligner, rgb)
                    if face is not None:
                        boxes[f.name] = face[0]
                        originals[f.name] = recognizer.describe(np.asarray(rgb), face[0])
                matched = judged = 0
                for n, count in people:
                    names = [f"{n}_{i:04d}.jpg" for i in range(1, count + 1)]
                    for name in names:
                        if name not in written or name not in boxes:
                            continue
                        with Image.open(written[name]) as img:
                            d = recognizer.describe(np.asarray(img.convert("RGB")), boxes[name])
                        others = [originals[o] for o in names if o != name and originals.get(o) is not None]
                        if d is None or not others:
                            continue
                        judged += 1
                        matched += any(recognizer.distance(d, o) < recognizer.THRESHOLD for o in others)
                rows.append({"folder": f"LFW test people with 2-4 photos ({len(people)} people)",
                             "photos": len(files), **_counts(summary), "seconds": seconds,
                             "own other photo matched": matched, "judged photos": judged})
            else:
                raise ValueError(f"Unknown folder part {part!r}; use {', '.join(FOLDER_PARTS)}.")
            log(f"{rows[-1]['folder']}: {rows[-1]['written']} of {rows[-1]['photos']} written in "
                f"{rows[-1]['seconds']:.0f} s")
    console.print(_table(rows, workers))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench-folders.json", json_safe({"workers": workers, "rows": rows}))
    return rows


def _counts(summary: dict) -> dict:
    return {"written": summary["anonymized"], "refused": summary["refused"], "errors": summary["errors"],
            "refusals": summary.get("refusals", {}), "retried": summary.get("retried", 0),
            "faces": summary["faces"]}


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"


def _table(rows: list[dict], workers: int) -> Table:
    table = Table(title=f"facefl anonymize with its defaults on folders of LFW people ({workers} workers)",
                  caption="Written: photos the gate released. Refusals by reason. Match, top-1: the written face "
                  "against each person's image 2 (not in the folder; dlib, < 0.6). MTCNN: of all the people, a face "
                  "still found (withheld counts as not found). HOG: of the faces HOG finds in the originals. Own "
                  "photo: written faces dlib matches to another photo of the same person in the folder.")
    for col in ("folder", "photos", "written", "refusals", "dlib match", "top-1", "MTCNN", "HOG", "own photo",
                "s/photo", "time"):
        table.add_column(col, justify="left" if col in ("folder", "refusals") else "right")
    for r in rows:
        refusals = ", ".join(f"{k} {v}" for k, v in r["refusals"].items()) or "-"
        own = "-" if r.get("own other photo matched") is None else f"{r['own other photo matched']} of {r['judged photos']}"
        table.add_row(r["folder"], str(r["photos"]), f"{r['written']} ({_pct(r['written'] / r['photos'])})", refusals,
                      _pct(r.get("dlib match")), _pct(r.get("top-1")), _pct(r.get("MTCNN finds")),
                      _pct(r.get("HOG keeps")), own, f"{r['seconds'] / r['photos']:.2f}", f"{r['seconds']:.0f} s")
    return table
