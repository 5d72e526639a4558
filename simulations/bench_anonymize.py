"""``facefl bench anonymize``: can an independent recognizer still tell who an anonymized face is?

Each transform anonymizes image 1 of LFW View-1 test people (``pairsDevTest.txt`` matched pairs); dlib's
ResNet face descriptor compares it with every person's original image 2 (see ``common.anonymization.reid`` for the
protocol). One table row per transform: match rate and top-1 (lower is better anonymization), whether MTCNN
still finds a face (higher keeps the image usable), how far the landmarks moved, and speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from common.anonymization.recognizer import DlibRecognizer
from common.anonymization.reid import HogDetector, ReidBench, ReidReport, Transform, lfw_test_people, open_people
from common.atomic import json_safe
from common.data.preprocess import FaceAligner


def run_anonymize_bench(
    *,
    lfw_root: str,
    people: int,
    transforms: list[tuple[str, Transform]],
    console: Console,
    detect_min_score: float = 0.9,
) -> list[ReidReport]:
    """Measure re-identification of ``people`` LFW test people under each transform and print a table.

    Parameters
    ----------
    lfw_root : str
        The LFW root (with ``pairsDevTest.txt``).
    people : int
        How many people: the first ``people`` distinct people of the matched pairs, in file order.
    transforms : list of (label, transform)
        Transforms from PIL image to PIL image (or None to refuse), e.g. ``common.anonymization.reid.gaussian_blur(8)``.
    console : rich.console.Console
        Where progress lines and the table go.
    detect_min_score : float, default 0.9
        MTCNN confidence that counts as "face still found" (0.9: what the training pipeline's aligner
        accepts; 0.0: any face MTCNN returns, which its own last stage already filters at 0.7).

    Returns
    -------
    list of ReidReport
        One per transform, in order.

    Raises
    ------
    RecognizerUnavailable
        When dlib or its model files are not installed.
    DataError
        When the LFW root or pairs file is unusable, or ``people`` exceeds the test people it holds.
    """
    if not transforms:
        raise ValueError("transforms is empty; pass at least one (label, transform) pair.")
    recognizer = DlibRecognizer()  # first: fail fast when dlib is missing, before reading any image
    start = time.perf_counter()
    bench = ReidBench(
        open_people(lfw_test_people(lfw_root, people)), recognizer=recognizer,
        aligner=FaceAligner(min_score=detect_min_score), hog=HogDetector(),
    )
    seconds = time.perf_counter() - start
    console.print(f"Detected and described the originals of {len(bench)} people in {seconds:.1f} s.")
    if bench.dropped:
        console.print(f"Left out {len(bench.dropped)} people without a detectable face in an original photo: "
                      f"{', '.join(bench.dropped)}.")

    reports = []
    for label, transform in transforms:
        start = time.perf_counter()
        report = bench.measure(transform, label)
        console.print(f"{label}: measured in {time.perf_counter() - start:.1f} s.")
        reports.append(report)
    print_table(reports, recognizer, bench.aligner.min_score, console=console)
    return reports


def print_table(reports: list[ReidReport], recognizer: DlibRecognizer, min_score: float, *,
                title: str = "Re-identification of anonymized LFW test people", console: Console | None = None) -> None:
    """Print one table row per report (see :func:`run_anonymize_bench`)."""
    (console or Console(width=150)).print(_table(reports, recognizer, min_score, title))


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def _table(reports: list[ReidReport], recognizer: DlibRecognizer, min_score: float, title: str) -> Table:
    n = reports[0].people
    table = Table(
        title=f"{title} ({n} people; {recognizer.name}, distance < {recognizer.THRESHOLD})",
        caption="Transformed image 1 against original image 2. Match, top-1: lower hides identity better. "
        f"Detection: MTCNN still finds a face (score >= {min_score:g}). Landmark displacement: median, in "
        "inter-ocular distances. HOG kept: of the faces dlib's HOG detector finds in the originals, the share it "
        "still finds. Source: still matched to the photo it came from. Gate withholds: matched to the source or the "
        "person's other photo (what an egress gate holding both refuses).",
    )
    table.add_column("transform")
    table.add_column("match rate", justify="right")
    table.add_column(f"top-1 (chance {_pct(1 / n)})", justify="right")
    table.add_column("MTCNN detection", justify="right")
    table.add_column("landmark displacement (x IOD)", justify="right")
    table.add_column("HOG kept", justify="right")
    table.add_column("source", justify="right")
    table.add_column("gate withholds", justify="right")
    table.add_column("refused", justify="right")
    table.add_column("img/s", justify="right")
    for r in reports:
        displacement = "-" if math.isnan(r.landmark_displacement) else f"{r.landmark_displacement:.3f}"
        ips = "-" if math.isinf(r.images_per_second) else f"{r.images_per_second:,.1f}"
        table.add_row(r.name, _pct(r.match_rate), _pct(r.top1), _pct(r.detection_rate), displacement,
                      _pct(r.hog_retention), _pct(r.source_match_rate), _pct(r.gate_withheld_rate), str(r.refused), ips)
    return table


def reports_to_json(reports: list[ReidReport]) -> list[dict]:
    """The reports as JSON-ready dicts (field names as in :class:`ReidReport`; NaN and infinity as None)."""
    return [json_safe(asdict(r)) for r in reports]

