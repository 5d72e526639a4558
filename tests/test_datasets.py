"""Identity-folder loading, the face cache, LFW protocol files and face alignment, on real data."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common.data.datasets as datasets
from common.data.datasets import (ALIGNED_CROP_FRACTION, DataError, Pair, is_lfw_root, lfw_image_relpath,
                                  lfw_train_identities, load_faces, load_lfw_pairs, read_pairs_file, read_people_file,
                                  tighter_resized)
from common.data.preprocess import FaceAligner, arcface_template, center_crop_face, estimate_similarity


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner(112)


def _copy_identities(lfw_root: Path, dest: Path, names: list[str], per_identity: int) -> Path:
    """A small identity-folder dataset in ``dest`` made of copies of LFW images."""
    for name in names:
        (dest / name).mkdir(parents=True)
        for src in sorted((lfw_root / name).glob("*.jpg"))[:per_identity]:
            shutil.copy(src, dest / name / src.name)
    return dest


@pytest.fixture
def small_set(lfw_root: Path, tmp_path: Path) -> Path:
    names = lfw_train_identities(lfw_root, min_images=4)[:3]
    return _copy_identities(lfw_root, tmp_path / "data", names, per_identity=3)


class _DecodeSpy:
    """Counts image decodes (the expensive step the cache saves) without changing them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = datasets._decode_image

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(datasets, "_decode_image", spy)


# ---------------------------------------------------------------------------- LFW protocol files


def test_lfw_protocol_counts(lfw_root: Path):
    assert is_lfw_root(lfw_root)
    dev_test = read_pairs_file(lfw_root / "pairsDevTest.txt")
    assert len(dev_test) == 1000
    assert sum(p.same for p in dev_test) == 500
    view2 = read_pairs_file(lfw_root / "pairs.txt")
    assert len(view2) == 6000 and sum(p.same for p in view2) == 3000

    train = read_people_file(lfw_root / "peopleDevTrain.txt")
    test = read_people_file(lfw_root / "peopleDevTest.txt")
    assert len(train) == 4038 and len(test) == 1711
    assert not {n for n, _ in train} & {n for n, _ in test}
    everyone = read_people_file(lfw_root / "people.txt")  # fold headers are skipped
    assert len(everyone) == 5749 and sum(c for _, c in everyone) == 13233

    first = dev_test[0]
    assert first == Pair("Abdullah_Gul", 13, "Abdullah_Gul", 14) and first.same
    assert lfw_image_relpath("Abdullah_Gul", 13) == "Abdullah_Gul/Abdullah_Gul_0013.jpg"
    assert all((lfw_root / p.relpath_a).is_file() and (lfw_root / p.relpath_b).is_file() for p in dev_test[::50])


def test_lfw_train_identities(lfw_root: Path):
    counts = dict(read_people_file(lfw_root / "peopleDevTrain.txt"))
    names = lfw_train_identities(lfw_root, min_images=2)
    assert names and all(counts[n] >= 2 for n in names)
    assert len(names) == sum(c >= 2 for c in counts.values())
    assert len(lfw_train_identities(lfw_root, min_images=1)) == 4038


def test_malformed_protocol_files_raise_with_file_and_line(tmp_path: Path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\nAlice\t1\t2\nBob\tone\tCarol\t3\n")
    with pytest.raises(DataError, match=r"pairs\.txt:3:"):
        read_pairs_file(pairs)
    pairs.write_text("two\nAlice\t1\t2\n")
    with pytest.raises(DataError, match=r"pairs\.txt:1:"):
        read_pairs_file(pairs)
    people = tmp_path / "people.txt"
    people.write_text("2\nAlice\t2\nBob\n")
    with pytest.raises(DataError, match=r"people\.txt:3:"):
        read_people_file(people)
    with pytest.raises(DataError, match="does not exist"):
        read_pairs_file(tmp_path / "absent.txt")
    assert not is_lfw_root(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path)):
        lfw_train_identities(tmp_path)


# ---------------------------------------------------------------------------- loading and cache


def test_load_lfw_slice(lfw_root: Path, tmp_path: Path):
    names = lfw_train_identities(lfw_root, min_images=2)[:20]
    faces = load_faces(lfw_root, image_size=32, identities=names, cache_dir=tmp_path, progress=False)
    counts = dict(read_people_file(lfw_root / "peopleDevTrain.txt"))
    assert faces.images.dtype == torch.uint8
    assert tuple(faces.images.shape) == (sum(counts[n] for n in names), 3, 32, 32)
    assert faces.identities == tuple(sorted(names))
    assert faces.skipped == {}
    assert faces.labels.dtype == torch.int64 and sorted(set(faces.labels.tolist())) == list(range(20))
    for path, label in zip(faces.paths, faces.labels.tolist()):
        assert path.split("/")[0] == faces.identities[label] and (lfw_root / path).is_file()
    assert faces.images.float().std() > 20  # real pictures, not a blank fill


def test_aligned_mode_is_dlibs_chip_cut_tighter_and_resized(lfw_root: Path, tmp_path: Path):
    names = lfw_train_identities(lfw_root, min_images=2)[:3]
    chips = load_faces(lfw_root, image_size=150, mode="dlib", identities=names, cache_dir=tmp_path, progress=False)
    aligned = load_faces(lfw_root, image_size=64, mode="aligned", identities=names, cache_dir=tmp_path,
                         progress=False)
    assert tuple(aligned.images.shape) == (len(chips), 3, 64, 64) and aligned.images.dtype == torch.uint8
    assert (aligned.paths, aligned.identities) == (chips.paths, chips.identities)
    assert torch.equal(aligned.images, tighter_resized(chips.images, ALIGNED_CROP_FRACTION, 64))
    # the central 80%: a corner of the aligned face is well inside the chip, not its padding
    inner = chips.images[:, :, 15:135, 15:135].float()
    small = torch.nn.functional.interpolate(inner, size=(64, 64), mode="bilinear", antialias=True)
    assert (small - aligned.images.float()).abs().mean() < 1.0
    assert sorted(p.name for p in next(tmp_path.iterdir()).iterdir()) == ["dlib-150"]  # only the chips are cached


def test_load_lfw_pairs_balanced_subset(lfw_root: Path, tmp_path: Path):
    a, b, same = load_lfw_pairs(lfw_root, image_size=32, cache_dir=tmp_path, max_pairs=10, progress=False)
    assert a.shape == b.shape == (10, 3, 32, 32) and a.dtype == torch.uint8
    assert same.dtype == torch.bool and int(same.sum()) == 5
    first = read_pairs_file(lfw_root / "pairsDevTest.txt")[0]  # a matched pair: first of the subset
    faces = load_faces(lfw_root, image_size=32, identities=[first.name_a], min_images=1, cache_dir=tmp_path,
                       progress=False)
    assert torch.equal(a[0], faces.images[faces.paths.index(first.relpath_a)])
    assert torch.equal(b[0], faces.images[faces.paths.index(first.relpath_b)])


def test_cache_is_reused_then_invalidated_by_a_new_file(lfw_root: Path, small_set: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    spy = _DecodeSpy(monkeypatch)
    cache = tmp_path / "cache"
    first = load_faces(small_set, image_size=32, mode="crop", cache_dir=cache, progress=False)
    assert spy.calls == 9 and len(first) == 9
    cache_files = sorted(cache.glob("*/crop-32/*.pt"))
    assert [f.stem for f in cache_files] == list(first.identities)

    second = load_faces(small_set, image_size=32, mode="crop", cache_dir=cache, progress=False)
    assert spy.calls == 9  # everything came from the cache
    assert torch.equal(first.images, second.images) and first.paths == second.paths

    name = first.identities[1]
    extra = sorted((lfw_root / name).glob("*.jpg"))[3]
    shutil.copy(extra, small_set / name / extra.name)
    third = load_faces(small_set, image_size=32, mode="crop", cache_dir=cache, progress=False)
    assert spy.calls == 9 + 4  # only the changed identity folder was recomputed
    assert len(third) == 10 and f"{name}/{extra.name}" in third.paths

    load_faces(small_set, image_size=48, mode="crop", cache_dir=cache, progress=False)
    assert spy.calls == 13 + 10  # another size is another cache


def test_corrupt_cache_file_is_recomputed(small_set: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache = tmp_path / "cache"
    first = load_faces(small_set, image_size=32, mode="crop", cache_dir=cache, progress=False)
    victim = sorted(cache.glob("*/crop-32/*.pt"))[0]
    victim.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="facefl.data"):
        again = load_faces(small_set, image_size=32, mode="crop", cache_dir=cache, progress=False)
    assert torch.equal(first.images, again.images)
    assert "corrupt" in caplog.text
    assert not list(victim.parent.glob(".tmp-*"))  # atomic writes leave no temporaries behind


def test_bad_inputs_are_skipped_and_counted(lfw_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    names = lfw_train_identities(lfw_root, min_images=4)[:3]
    root = _copy_identities(lfw_root, tmp_path / "data", names, per_identity=3)
    (root / names[0] / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    (root / names[0] / "notes.txt").write_text("photographer: unknown\n")
    for extra in sorted((root / names[2]).glob("*.jpg"))[1:]:  # leave a one-image identity
        extra.unlink()

    with caplog.at_level(logging.WARNING, logger="facefl.data"):
        faces = load_faces(root, image_size=32, mode="crop", min_images=2, cache_dir=tmp_path / "c", progress=False)
    assert faces.identities == tuple(sorted(names[:2]))
    assert len(faces) == 6
    assert faces.skipped == {"unreadable": 1, "not-an-image": 1, "too-few-images": 1}
    warnings = [r for r in caplog.records if r.name == "facefl.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 unreadable files" in warnings[0].getMessage()

    picked = load_faces(root, image_size=32, mode="crop", identities=[names[1], "Nobody_Here"], min_images=1,
                        cache_dir=tmp_path / "c", progress=False)
    assert picked.identities == (names[1],) and picked.skipped == {"missing-identity": 1}


def test_image_modes_become_rgb(lfw_root: Path, tmp_path: Path):
    src = Image.open(sorted((lfw_root / "Aaron_Peirsol").glob("*.jpg"))[0])
    person = tmp_path / "data" / "Someone"
    person.mkdir(parents=True)
    src.convert("L").save(person / "gray.PGM")
    src.convert("RGBA").save(person / "alpha.png")
    src.convert("P").save(person / "palette.png")
    src.save(person / "upper.JPEG")
    faces = load_faces(tmp_path / "data", image_size=32, mode="crop", cache_dir=tmp_path / "c", progress=False)
    assert faces.images.shape == (4, 3, 32, 32) and faces.skipped == {}
    gray = faces.images[faces.paths.index("Someone/gray.PGM")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_missing_and_empty_datasets_raise_naming_the_path(tmp_path: Path):
    missing = tmp_path / "no" / "such" / "place"
    with pytest.raises(DataError, match=f"does not exist: {missing}"):
        load_faces(missing, cache_dir=tmp_path, progress=False)
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match=f"not a directory: {a_file}"):
        load_faces(a_file, cache_dir=tmp_path, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        load_faces(empty, mode="crop", cache_dir=tmp_path, progress=False)
    (empty / "Somebody").mkdir()
    (empty / "Somebody" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=f"No usable face images in {empty}.*1 unreadable"):
        load_faces(empty, mode="crop", min_images=1, cache_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------- preprocessing


def test_center_crop_face_keeps_the_centre(lfw_root: Path):
    img = Image.open(sorted((lfw_root / "Aaron_Peirsol").glob("*.jpg"))[0])
    face = center_crop_face(img, 40)
    assert face.dtype == torch.uint8 and face.shape == (3, 40, 40)
    whole = center_crop_face(img, 40, crop_fraction=1.0)
    assert not torch.equal(face, whole)


def test_estimate_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = estimate_similarity(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), dst)


def test_aligner_finds_and_levels_a_face(aligner: FaceAligner, faces_dir: Path):
    result = aligner.align(Image.open(faces_dir / "brad_pitt.jpg"))
    assert result.found and result.score > 0.95 and result.num_faces == 1
    assert result.face.shape == (3, 112, 112) and result.face.dtype == torch.uint8
    # Detecting again on the aligned output finds the landmarks on the template: eyes level and centred.
    _, scores, points = aligner.detect(Image.fromarray(result.face.permute(1, 2, 0).numpy()))
    assert len(scores) == 1
    eyes = points[0][:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 2.0
    assert abs(eyes[:, 0].mean() - 56.0) < 3.0
    assert np.abs(points[0] - arcface_template(112)).max() < 6.0
    assert result.face.float().std() > 20

    nothing = aligner.align(Image.open(faces_dir / "no_face_chicago.jpg"))
    assert not nothing.found and nothing.score == 0.0 and nothing.num_faces == 0
    assert nothing.face.shape == (3, 112, 112) and int(nothing.face.max()) == 0
    assert nothing.landmarks.shape == (5, 2)


def test_detect_mode_counts_photos_without_a_face(faces_dir: Path, tmp_path: Path):
    person = tmp_path / "photos" / "Lenna"
    person.mkdir(parents=True)
    shutil.copy(faces_dir / "lenna.jpg", person / "lenna.jpg")
    shutil.copy(faces_dir / "no_face_chicago.jpg", person / "street.jpg")
    faces = load_faces(tmp_path / "photos", image_size=32, min_images=1, cache_dir=tmp_path / "c",
                       progress=False)  # "auto" -> detect: not an LFW root
    assert faces.paths == ("Lenna/lenna.jpg",) and faces.images.shape == (1, 3, 32, 32)
    assert faces.skipped == {"no-face": 1}
    assert list((tmp_path / "c").glob("*/detect-32/Lenna.pt"))
