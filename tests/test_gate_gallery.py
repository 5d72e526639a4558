"""The egress gate's gallery rule: withheld on evidence of the person's identity, not on nearness to anyone; and
``facefl anonymize``'s folder pipeline (gallery described once, worker processes) on real LFW photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.anonymization.anonymizer import FaceRecord
from common.anonymization.egress import RANK_EVIDENCE_ODDS, _gallery_refusal
from common.anonymization.recognizer import DlibRecognizer

T = DlibRecognizer.THRESHOLD
CENTRE = (70, 60, 180, 190)  # where the face of a 250x250 LFW deep-funneled photo sits


@pytest.fixture(scope="module")
def recognizer() -> DlibRecognizer:
    return DlibRecognizer()


def _describe(recognizer, path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return recognizer.describe(np.asarray(img.convert("RGB")), CENTRE)


@pytest.fixture(scope="module")
def people(lfw_root, recognizer):
    """Two photos of one person that dlib matches, and 60 strangers' photos (real descriptors)."""
    from common.anonymization.reid import lfw_test_people

    pairs = lfw_test_people(lfw_root, 80, skip=220)
    for name, p1, p2 in pairs:
        a1, a2 = _describe(recognizer, p1), _describe(recognizer, p2)
        if np.linalg.norm(a1 - a2) < 0.5:
            break
    strangers = [_describe(recognizer, p1) for other, p1, _ in pairs if other != name][:60]
    return (a1, str(p2)), a2, strangers


def _released(descriptor, source) -> FaceRecord:
    return FaceRecord((0, 0, 1, 1), 1.0, np.zeros((5, 2), np.float32), 0.9, False, np.asarray(descriptor),
                      np.asarray(source))


def _away(point: np.ndarray, others: list[np.ndarray], distance: float, rng) -> np.ndarray:
    """A descriptor at ``distance`` from ``point`` and farther from every one of ``others``."""
    for _ in range(1000):
        step = rng.normal(size=point.shape)
        candidate = point + distance * step / np.linalg.norm(step)
        if min(np.linalg.norm(candidate - o) for o in others) > distance + 0.05:
            return candidate
    raise AssertionError("no such point")


def test_a_match_to_another_photo_of_the_person_is_withheld_a_match_to_a_stranger_is_not(people):
    (a1, a2_label), a2, strangers = people
    gallery = np.stack([a2, *strangers[:5]])
    labels = [a2_label] + [f"stranger-{i}" for i in range(5)]
    # The released face (from photo 1) is what dlib would match to photo 2 of the same person: withheld, named.
    hit = _gallery_refusal(_released(a2 + 0.01, a1), gallery, labels, T, "same-person")
    assert hit.reason == "same-person-match" and hit.matched == a2_label and hit.distance < T
    assert a2_label in hit.message
    # The released face is a stranger's look: near a photo the site holds, but of someone else. Not a leak.
    near_stranger = strangers[0] + 0.01
    assert np.linalg.norm(near_stranger - a2) > T
    assert _gallery_refusal(_released(near_stranger, a1), gallery, labels, T, "same-person") is None
    # Under the "any" rule (generated images), a match to any gallery face is withheld.
    any_hit = _gallery_refusal(_released(near_stranger, a1), gallery, labels, T, "any")
    assert any_hit.reason == "gallery-match" and any_hit.matched == "stranger-0"
    # Without the source's original descriptor, who the person is cannot be told: every gallery face counts.
    unknown = FaceRecord((0, 0, 1, 1), 1.0, np.zeros((5, 2), np.float32), 0.9, False, near_stranger, None)
    assert _gallery_refusal(unknown, gallery, labels, T, "same-person").reason == "gallery-match"


def test_ranking_the_person_first_is_withheld_only_when_chance_would_rarely_do_it(people):
    (a1, a2_label), a2, strangers = people
    rng = np.random.default_rng(0)
    # Beyond the threshold of photo 2, yet nearer to it than to any stranger: an attacker ranking the gallery finds
    # the person.
    released = _away(a2, strangers, 0.62, rng)
    large = np.stack([a2, *strangers[: RANK_EVIDENCE_ODDS - 1]])
    labels = [a2_label] + [f"stranger-{i}" for i in range(RANK_EVIDENCE_ODDS - 1)]
    rank = _gallery_refusal(_released(released, a1), large, labels, T, "same-person")
    assert rank.reason == "same-person-rank" and rank.matched == a2_label and rank.distance > T
    # In a gallery of a few faces, being nearest to the person is what chance does often: not evidence.
    small = large[:10]
    assert _gallery_refusal(_released(released, a1), small, labels[:10], T, "same-person") is None


def test_folder_through_the_gate_in_one_process_and_in_workers(lfw_root, tmp_path, monkeypatch):
    """A folder with 3 photos of one person and 5 strangers, through the pipeline of ``facefl anonymize`` (shipped
    stylizer, dlib gate, gallery of all inputs): no written face matches another photo of its own person; the
    report names each refusal's reason and photo; workers give the same outcome as one process."""
    import functools

    import client.photos as photos
    from server.stylizers import photo_pipeline

    root = Path(lfw_root)
    person = "Al_Pacino"  # View-1 test people (no stylizer trained on them)
    own = [root / person / f"{person}_{i:04d}.jpg" for i in (1, 2, 3)]
    strangers = [root / n / f"{n}_0001.jpg" for n in ("AJ_Lamas", "Aaron_Guiel", "Aaron_Tippin", "Abba_Eban",
                                                       "Abdul_Majeed_Shobokshi")]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in own + strangers:
        (folder / f.name).symlink_to(f)
    build = functools.partial(photo_pipeline, verify=True)
    stages = []
    anonymizer, gate = build()
    one = photos.anonymize_files([str(folder)], tmp_path / "one", anonymizer=anonymizer, gate=gate,
                                 check_inputs=True, progress=lambda *a: stages.append(a))
    assert one["images"] == 8 and one["errors"] == 0 and one["gallery faces"] >= 8
    assert ("describe", 8, 8) in stages and ("anonymize", 8, 8) in stages
    assert one["anonymized"] + one["refused"] == 8 and one["anonymized"] >= 6
    assert sum(one["refusals"].values()) == one["refused"]
    report = json.loads((tmp_path / "one" / "anonymize-report.json").read_text())
    for f in report["files"]:
        assert f["status"] in ("anonymized", "refused")
        if f["status"] == "refused":
            assert f["reason"] in ("source-match", "same-person-match", "same-person-rank") and f["message"]
            assert f["reason"] == "source-match" or Path(f["matched"]).name in {p.name for p in own}
    # The gate's purpose: no written face of the person matches one of their other photos in the folder.
    recognizer = DlibRecognizer()
    originals = {p.name: _describe(recognizer, p) for p in own}
    for f in report["files"]:
        name = Path(f["source"]).name
        if f["output"] and name in originals:
            with Image.open(f["output"]) as img:
                faces = gate.anonymizer.describe(img)
            for d in faces.descriptors:
                assert all(np.linalg.norm(d - originals[o]) >= T for o in originals if o != name)
    # The same folder in 2 worker processes (the pool a large folder gets): the same decisions.
    monkeypatch.setattr(photos, "PHOTOS_PER_WORKER", 2)
    pooled = photos.anonymize_files([str(folder)], tmp_path / "pool", check_inputs=True, workers=2, build=build,
                                    verify=True)
    assert pooled["workers"] == 2 and pooled["gallery faces"] == one["gallery faces"]
    assert [(f["source"], f["status"], f["reason"]) for f in pooled["files"]] == \
        [(f["source"], f["status"], f["reason"]) for f in one["files"]]
