"""Any identity-folder dataset, not only LFW: a hospital's own folder (one sub-folder per person, no LFW protocol
files) trains and evaluates.

The folder is built from a small slice of real LFW photos (read, never modified) but laid out the way a hospital's
export might be: person folders named unlike LFW's (spaces, dots, commas, an accent), file names unlike LFW's with
several dots and odd extensions (``IMG_0001.JPG``, ``scan.2024-01-01.jpeg``, ``visit.final.2.png`` saved as a real
PNG, a grayscale ``.PGM``), photos of mixed sizes (250x250, 180x240, 400x400, 120x120), one person with a single
photo, an unreadable file (garbage bytes named ``.jpg``), a non-image (``notes.txt``), macOS litter (``.DS_Store``,
``._IMG_0001.JPG``) and a stray file beside the person folders. With real models and no mocks: the seeded split of
people (evaluation / training / validation), the server's test protocol (balanced seeded pairs, impostors, rank-1)
scored by dlib's zero-shot face ResNet, the skipped files counted, and one DP round of a site that reads the folder
(the deployment path).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from client.privacy import PrivacyLedger
from client.site import Site, SiteState, run_round
from common.config import RunConfig
from common.data.datasets import is_lfw_root, load_faces, read_people_file
from common.data.partition import split_heldout_identities
from common.data.sources import (eval_data, evaluation_identities, protocol_data, site_identities,
                                 training_identities, validation_data, validation_identities)
from common.models.federated import build_models
from server.evaluate import evaluate_protocol

dlib = pytest.importorskip("dlib")

# Person folders as a hospital might name them: nothing like LFW's First_Last.
NAMES = ["patient-001", "patient-007", "patient-012", "patient-103", "Dr. Smith", "Müller, Anna", "o'brien j",
         "MRN 004521", "case.2024.17", "Jean-Luc", "ward3_bed12", "X", "anon (2)", "subject_A.v2", "p-0042", "zz top"]
PHOTOS = 4  # per person (but one person has a single photo)
HELDOUT_FRACTION = 0.3  # 5 of 16 people held out: enough people for impostor pairs and rank-1 (default 0.15: 2)
SEED = 0
GARBAGE = "IMG_9999.jpg"  # garbage bytes with an image extension: unreadable
NOTES = "notes.txt"  # not an image


def _variant(src: Path, dest: Path, kind: int, k: int) -> str:
    """Write photo ``k`` of a person from LFW photo ``src`` as variant ``kind``; returns the file name."""
    if kind == 0:  # the original JPEG, 250x250, upper-case extension
        name = f"IMG_{k + 1:04d}.JPG"
        shutil.copyfile(src, dest / name)
        return name
    with Image.open(src) as img:
        img = img.convert("RGB")
        if kind == 1:  # a portrait crop, 180x240, two dots in the name
            name = f"scan.2024-01-0{k + 1}.jpeg"
            img.crop((31, 0, 219, 250)).resize((180, 240), Image.BICUBIC).save(dest / name, "JPEG", quality=92)
        elif kind == 2:  # upscaled to 400x400, a real PNG
            name = f"visit.final.{k + 1}.png"
            img.resize((400, 400), Image.BICUBIC).save(dest / name, "PNG")
        else:  # a small thumbnail, 120x120
            name = f"thumb.v2.{k + 1}.jpg"
            img.resize((120, 120), Image.BICUBIC).save(dest / name, "JPEG", quality=90)
    return name


@dataclass(frozen=True)
class Hospital:
    root: Path
    held: list[str]  # the people the seeded split holds out (HELDOUT_FRACTION, SEED)
    single: str  # the person with one photo (held out)
    garbage_person: str  # held out; their folder holds the unreadable file
    gray_person: str  # held out; one of their photos is a grayscale .PGM
    gray_file: str
    notes_person: str  # a training person; their folder holds notes.txt


@pytest.fixture(scope="module")
def hospital(lfw_root: Path, tmp_path_factory) -> Hospital:
    root = tmp_path_factory.mktemp("identity-folder") / "hospital-faces"
    lfw_people = [name for name, count in read_people_file(lfw_root / "peopleDevTest.txt") if count >= PHOTOS]
    sources = dict(zip(NAMES, lfw_people))
    train, held = split_heldout_identities(NAMES, HELDOUT_FRACTION, SEED)
    single, garbage_person, gray_person, notes_person = held[0], held[1], held[2], train[0]
    gray_file = ""
    for i, name in enumerate(NAMES):
        folder = root / name
        folder.mkdir(parents=True)
        photos = sorted((lfw_root / sources[name]).glob("*.jpg"))[: 1 if name == single else PHOTOS]
        for k, src in enumerate(photos):
            if name == single:
                shutil.copyfile(src, folder / "only-photo.jpeg")
            elif name == gray_person and k == PHOTOS - 1:
                gray_file = f"portrait.{k + 1}.gray.PGM"
                with Image.open(src) as img:
                    img.convert("L").save(folder / gray_file, "PPM")  # PIL writes mode L as a binary PGM
            else:
                _variant(src, folder, (i + k) % 4, k)
    (root / garbage_person / GARBAGE).write_bytes(b"\xff\xd8 this is not a JPEG \x00\x01" * 40)
    (root / notes_person / NOTES).write_text("Consent on file. Photos from the 2024 visits.\n")
    (root / NAMES[5] / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" * 10)  # hidden: ignored, not counted
    (root / NAMES[6] / "._IMG_0001.JPG").write_bytes(b"\x00\x05\x16\x07" * 20)  # AppleDouble litter: hidden
    (root / "index.csv").write_text("folder,mrn\n")  # a file beside the person folders is not a person
    assert not is_lfw_root(root) and not list(root.glob("*.txt"))  # no LFW protocol files
    return Hospital(root, held, single, garbage_person, gray_person, gray_file, notes_person)


@pytest.fixture(scope="module")
def cfg(hospital: Hospital, cache_dir: Path) -> RunConfig:
    return RunConfig(data=str(hospital.root), cache_dir=str(cache_dir), heldout_fraction=HELDOUT_FRACTION, seed=SEED)


@pytest.fixture(scope="module")
def all_faces(hospital: Hospital, cache_dir: Path):
    """Every person with two or more usable photos, as a deployed site reads its folder (dlib's 150 px chips)."""
    return load_faces(hospital.root, image_size=150, mode="dlib", min_images=2, cache_dir=cache_dir, progress=False)


def test_the_seeded_split_holds_people_out(hospital: Hospital, cfg: RunConfig, cache_dir: Path):
    plain = RunConfig(data=str(hospital.root), cache_dir=str(cache_dir))
    assert (plain.model, plain.face_mode, plain.image_size, plain.trainable_part) == \
        ("dlib-resnet", "dlib", 150, "projection")
    assert len(evaluation_identities(plain)) == 2  # the default heldout-fraction (0.15) of 16 people, at least 2

    held, train, val = evaluation_identities(cfg), training_identities(cfg), validation_identities(cfg)
    assert held == hospital.held and len(held) == round(HELDOUT_FRACTION * len(NAMES)) == 5
    assert len(val) == 2  # validation-people (100) is capped at a fifth of the 11 training people
    assert len(train) == len(NAMES) - 5 - 2
    assert not set(held) & set(train) and not set(held) & set(val) and not set(train) & set(val)
    assert sorted(held + train + val) == sorted(NAMES)  # every person folder, and nothing else ("index.csv")
    assert hospital.single in held and hospital.notes_person in train + val

    again = RunConfig(data=str(hospital.root), cache_dir=str(cache_dir), heldout_fraction=HELDOUT_FRACTION, seed=SEED)
    assert (evaluation_identities(again), training_identities(again), validation_identities(again)) == \
        (held, train, val)
    other = cfg.replace(seed=SEED + 1)
    held1, train1, val1 = evaluation_identities(other), training_identities(other), validation_identities(other)
    assert held1 != held and sorted(held1 + train1 + val1) == sorted(NAMES)
    assert not set(held1) & (set(train1) | set(val1))

    sites = [site_identities(cfg, i, 2) for i in range(2)]  # a simulation over this folder: sites share the rest
    assert not set(sites[0]) & set(sites[1]) and sorted(sites[0] + sites[1]) == sorted(train)


def test_bad_files_are_skipped_and_counted(hospital: Hospital, cache_dir: Path, all_faces, caplog):
    skipped = all_faces.skipped
    assert skipped.get("unreadable") == 1 and skipped.get("not-an-image") == 1  # litter: hidden, not counted
    assert skipped.get("too-few-images") == 1  # the person with one photo (min_images=2)
    assert set(skipped) <= {"unreadable", "not-an-image", "too-few-images", "no-face"}
    photos = (len(NAMES) - 1) * PHOTOS
    assert len(all_faces) == photos - skipped.get("no-face", 0) >= photos - 2
    assert all_faces.images.dtype == torch.uint8 and tuple(all_faces.images.shape[1:]) == (3, 150, 150)
    assert all_faces.identities == tuple(sorted(set(NAMES) - {hospital.single}))
    assert not any(Path(p).name.startswith(".") or p.endswith((GARBAGE, NOTES)) for p in all_faces.paths)
    suffixes = {Path(p).suffix for p in all_faces.paths}
    assert suffixes == {".JPG", ".jpeg", ".png", ".jpg", ".PGM"}
    gray = all_faces.paths.index(f"{hospital.gray_person}/{hospital.gray_file}")
    chip = all_faces.images[gray]
    assert torch.equal(chip[0], chip[1]) and torch.equal(chip[1], chip[2]) and chip.float().std() > 10

    with caplog.at_level(logging.WARNING, logger="facefl.data"):  # read back from the face cache: same counts
        everyone = load_faces(hospital.root, image_size=150, mode="dlib", min_images=1, cache_dir=cache_dir,
                              progress=False)
    assert "1 unreadable files" in caplog.text and "1 non-image files" in caplog.text
    assert "too-few-images" not in everyone.skipped and hospital.single in everyone.identities
    assert torch.equal(everyone.by_identity(all_faces.identities).images, all_faces.images)


def test_the_test_protocol_on_held_out_people(hospital: Hospital, cfg: RunConfig):
    protocol = protocol_data(cfg, progress=False)
    faces = protocol.faces
    assert faces.identities == tuple(hospital.held)  # the single-photo person too (min_images=1)
    assert faces.skipped.get("unreadable") == 1  # the garbage file sits in a held-out folder
    n = len(protocol.same)
    assert n == 1000 and int(protocol.same.sum()) == n // 2  # the default eval-pairs, balanced
    labels = faces.labels
    assert torch.equal(labels[protocol.pair_a] == labels[protocol.pair_b], protocol.same)
    assert not (protocol.pair_a == protocol.pair_b).any()  # a matched pair is two different photos
    assert protocol.description == (f"hospital-faces: held-out identities (5), {n} pairs; "
                                    "rank-1 identification of 4 probes among 5 people")

    k = faces.identities.index(hospital.single)
    assert int((labels == k).sum()) == 1
    assert k in labels[protocol.gallery].tolist() and k not in labels[protocol.probes].tolist()
    matched = torch.cat([protocol.pair_a[protocol.same], protocol.pair_b[protocol.same]])
    assert k not in labels[matched].tolist()
    mismatched = torch.cat([protocol.pair_a[~protocol.same], protocol.pair_b[~protocol.same]])
    assert k in labels[mismatched].tolist()  # an impostor, never a genuine pair

    again = protocol_data(cfg, progress=False)  # the same seed: the same pairs
    for name in ("pair_a", "pair_b", "same", "gallery", "probes"):
        assert torch.equal(getattr(again, name), getattr(protocol, name)), name
    reseeded = protocol_data(cfg.replace(seed=SEED + 1), progress=False)
    assert reseeded.faces.identities != faces.identities

    model = build_models(cfg).embedding.eval()  # dlib's face ResNet, zero-shot
    metrics = evaluate_protocol(model, protocol)
    print(f"\nzero-shot dlib-resnet on {protocol.description}: {metrics}")
    different = labels[:, None] != labels[None, :]
    assert metrics["impostor_pairs"] == int(torch.triu(different, diagonal=1).sum())  # every photo is in a pair
    assert metrics["impostor_pairs"] >= 100 and math.isnan(metrics["tar@far=1e-3"])  # too few impostors for 1e-3
    assert (metrics["gallery"], metrics["probes"]) == (5, 4)
    for key in ("accuracy", "accuracy_std", "roc_auc", "tar@far=1e-2", "rank1"):
        assert math.isfinite(metrics[key]), key
    assert metrics["accuracy"] >= 0.9 and metrics["roc_auc"] >= 0.95
    assert metrics["tar@far=1e-2"] >= 0.7 and metrics["rank1"] >= 0.75

    # The server's per-round evaluation and its validation people read the same folder.
    held = eval_data(cfg.replace(eval_pairs=100))
    assert held.description == "hospital-faces: held-out identities (5), 100 pairs"
    assert tuple(held.pairs_a.shape) == (100, 3, 150, 150) and int(held.same.sum()) == 50
    assert len(held.faces) == len(faces) and len(held.reference) == 0
    val = validation_data(cfg)
    assert val is not None and val.description.startswith("validation people (2, never a site's")
    # Matched pairs: every pair of each validation person's photos; mismatched: up to ten times as many, drawn
    # (with two people about half the draws are impostors, so there may be a few less).
    assert int(val.same.sum()) >= 2 and 0 < int((~val.same).sum()) <= 10 * int(val.same.sum())
    assert tuple(val.images.shape[1:]) == (3, 150, 150)


def test_a_site_trains_on_its_own_folder_under_dp(hospital: Hospital, cfg: RunConfig, all_faces, tmp_path: Path):
    site_cfg = cfg.replace(dp=True, target_epsilon=8.0)
    site = Site(name="St. Mary's radiology", state_dir=tmp_path / "site", data_path=str(hospital.root))
    start = build_models(site_cfg).state_dict()
    result = run_round(site_cfg, site, start, 1, SiteState())
    assert not result.declined and result.state is not None
    assert sorted(result.state) == sorted(start)
    for key, value in result.state.items():
        assert value.shape == start[key].shape and torch.isfinite(value).all(), key
    assert any(not torch.equal(result.state[k], start[k]) for k in start)  # it trained

    metrics = result.metrics
    print(f"\nDP round on {hospital.root.name}: {metrics}")
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0 < metrics["epsilon"] <= 8.0 and metrics["noise-multiplier"] > 0
    assert metrics["num-identities"] == len(NAMES) - 1  # the single-photo person cannot train a margin head
    assert metrics["num-examples"] < len(all_faces)  # the rest is the site's own validation split
    no_face = all_faces.skipped.get("no-face", 0)
    assert metrics["skipped-images"] == 2 + no_face and metrics["skipped-identities"] == 1
    ledger = PrivacyLedger.load(site.state_dir)
    assert ledger is not None and ledger.spent == pytest.approx(metrics["epsilon"])
