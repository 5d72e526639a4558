"""``facefl morph`` end to end on real LFW photos, a really (briefly) trained VAE run and a really trained stylizer.

Nothing is mocked: the run directory holds a VAE trained on LFW training faces, photos are raw 250x250 LFW JPEGs of
two test identities, anonymization goes through the real egress gate (stylizer + dlib).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import patience
from PIL import Image

from common.config import RunConfig
from common.data.datasets import load_faces, read_pairs_file, read_people_file
from common.data.preprocess import FaceAligner, align_to_template, arcface_template, center_crop_face, lfw_crop_template
from common.models.federated import build_models
from common.models.morphing import gif_bytes, loop_frames, mse, placeholder, strip, to_pil, upscale
from server.morph import prepare_face
from server.rundir import RunDirectory, load_run_models

FACEFL = str(Path(sys.executable).with_name("facefl"))
STEPS, SIZE, GAP = 11, 128, 2


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def photos(lfw_root: Path) -> tuple[Path, Path]:
    """Two raw LFW photos of different people from the test identities (the first mismatched pair of
    pairsDevTest), never seen by the VAE."""
    pair = next(p for p in read_pairs_file(lfw_root / "pairsDevTest.txt") if not p.same)
    return lfw_root / pair.relpath_a, lfw_root / pair.relpath_b


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, lfw_root: Path, cache_dir: Path) -> Path:
    """A run directory whose round-1 checkpoint is a VAE trained for 2 epochs on ~130 LFW training faces."""
    people = read_people_file(lfw_root / "peopleDevTrain.txt")
    names = [name for name, count in people if 6 <= count <= 12][:18]
    faces = load_faces(lfw_root, image_size=64, identities=names, cache_dir=cache_dir, progress=False)
    cfg = RunConfig(task="vae", data=str(lfw_root), image_size=64, dp=False, vae_lr=2e-3, num_rounds=1)
    path = tmp_path_factory.mktemp("morph-run") / "run"
    run = RunDirectory.create(path, cfg)
    models = build_models(cfg)
    from client.train import train_vae

    train_vae(models.vae, faces, epochs=2, batch_size=32, lr=cfg.vae_lr, beta=cfg.vae_beta, recon=cfg.vae_recon,
              augment=False, dp=None, discriminator=None, proximal_mu=0.0, seed=0)
    run.save_checkpoint(1, models.state_dict(), {})
    return path


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory, lfw_root: Path) -> Path:
    """A run that trained only the embedding model (no VAE), with a checkpoint."""
    cfg = RunConfig(task="embedding", model="compact", data=str(lfw_root), image_size=64, dp=False, num_rounds=1)
    path = tmp_path_factory.mktemp("embedding-run") / "run"
    run = RunDirectory.create(path, cfg)
    run.save_checkpoint(1, build_models(cfg).state_dict(), {})
    return path


@pytest.fixture(scope="module")
def plain_morph(tmp_path_factory, vae_run: Path, photos) -> tuple[subprocess.CompletedProcess, Path]:
    """``facefl morph A B --no-anonymize`` through the real console script."""
    out = tmp_path_factory.mktemp("morph-plain") / "ab.gif"
    proc = subprocess.run([FACEFL, "morph", str(photos[0]), str(photos[1]), "--run", str(vae_run), "--steps",
                           str(STEPS), "--out", str(out), "--no-anonymize"],
                          capture_output=True, text=True, timeout=patience(300),
                          env={**os.environ, "COLUMNS": "200"})
    return proc, out


def _gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.float64))
    return frames


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean())


def _facefl_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the console-script entry point in this process; returns (exit code, stderr)."""
    from simulations.cli import main

    monkeypatch.setattr(sys, "argv", ["facefl", *args])
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("FACEFL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ framing
def test_lfw_crop_template_frames_photos_like_training_crops(lfw_root: Path):
    """Aligning raw LFW photos to the LFW-crop template reproduces their centre crops (what the VAE trains on):
    far closer than the ArcFace alignment does, and than another person's crop. Single photos vary with head pose
    (and a photo whose largest face is a bystander's), so the medians over 8 test photos are compared."""
    aligner = FaceAligner(64)
    pairs = [p for p in read_pairs_file(lfw_root / "pairsDevTest.txt") if not p.same][:8]
    own, other, arcface = [], [], []
    for pair in pairs:
        img = Image.open(lfw_root / pair.relpath_a).convert("RGB")
        crop = center_crop_face(img, 64).float()
        other_crop = center_crop_face(Image.open(lfw_root / pair.relpath_b), 64).float()
        result = aligner.align(img, template=lfw_crop_template(64))
        assert result.found, pair.relpath_a
        aligned = result.face.float()
        own.append(float((aligned - crop).abs().mean()))
        other.append(float((aligned - other_crop).abs().mean()))
        arcface.append(float((aligner.align(img).face.float() - crop).abs().mean()))
        # the default stays the ArcFace template
        default = align_to_template(img, result.landmarks, 64)
        assert torch.equal(default, align_to_template(img, result.landmarks, 64, arcface_template(64)))
    med = {k: float(np.median(v)) for k, v in (("own", own), ("other", other), ("arcface", arcface))}
    assert med["own"] < 18.0 and med["own"] < 0.35 * med["other"] and med["own"] < 0.7 * med["arcface"], med


# ------------------------------------------------------------------------------------------------ pictures
def test_strip_gif_and_placeholders():
    frames = [upscale(to_pil(torch.full((3, 64, 64), v)), 96) for v in np.linspace(0.1, 0.9, 5)]
    assert frames[0].size == (96, 96)
    assert strip(frames, gap=3).size == (5 * 96 + 4 * 3, 96)
    assert len(loop_frames(frames)) == 8 and len(loop_frames(frames, pingpong=False)) == 5
    import io

    with Image.open(io.BytesIO(gif_bytes(frames, frame_ms=80))) as gif:
        assert gif.n_frames == 8 and gif.info["loop"] == 0 and gif.info["duration"] == 80
    with Image.open(io.BytesIO(gif_bytes(frames, pingpong=False))) as gif:
        assert gif.n_frames == 5
    # withheld frames: grey, no face, and consecutive ones stay distinct frames in the GIF
    grey = [placeholder(96, alpha=a) for a in (0.2, 0.3, 0.4)]
    assert all(mse(grey[i], grey[i + 1]) > 0 for i in range(2))
    with Image.open(io.BytesIO(gif_bytes(grey, pingpong=False))) as gif:
        assert gif.n_frames == 3
    with pytest.raises(ValueError, match="frame_ms"):
        gif_bytes(frames, frame_ms=5)
    with pytest.raises(ValueError, match="same size"):
        strip([frames[0], upscale(frames[1], 64)])


# ------------------------------------------------------------------------------------------------ the command
def test_cli_morph_without_anonymization(plain_morph, vae_run: Path, photos):
    proc, out = plain_morph
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "11 frames" in proc.stderr and "checkpoint round 1" in proc.stderr and "not anonymized" in proc.stderr
    strip_path = out.with_name("ab-strip.png")
    assert out.is_file() and strip_path.is_file()

    frames = _gif_frames(out)
    assert len(frames) == 2 * STEPS - 2  # A..B then B-1..A+1 (ping-pong)
    assert frames[0].shape == (SIZE, SIZE, 3)
    assert np.array_equal(frames[STEPS], frames[STEPS - 2]) and np.array_equal(frames[-1], frames[1])
    with Image.open(strip_path) as im:
        assert im.size == (STEPS * SIZE + (STEPS - 1) * GAP, SIZE)
        strip_px = np.asarray(im.convert("RGB"), dtype=np.float64)

    # The ends are the VAE's own reconstructions of A and B (through the same alignment).
    cfg, models, _ = load_run_models(vae_run)
    aligner = FaceAligner(cfg.image_size)
    recon = [np.asarray(upscale(to_pil(models.vae.reconstruct(prepare_face(p, cfg=cfg, aligner=aligner)[None])[0]),
                                SIZE), dtype=np.float64) for p in photos]
    forward = frames[:STEPS]
    assert _mse(forward[0], recon[0]) < _mse(forward[0], recon[1])
    assert _mse(forward[-1], recon[1]) < _mse(forward[-1], recon[0])
    first_tile = strip_px[:, :SIZE]
    assert _mse(first_tile, recon[0]) < 30.0  # the strip holds the frames unquantized
    # every step changes the picture, and the frames walk from A to B
    assert all(_mse(forward[i], forward[i + 1]) > 0 for i in range(STEPS - 1))
    to_a = [_mse(f, recon[0]) for f in forward]
    to_b = [_mse(f, recon[1]) for f in forward]
    assert np.corrcoef(np.arange(STEPS), to_a)[0, 1] > 0.9 and np.corrcoef(np.arange(STEPS), to_b)[0, 1] < -0.9


def test_cli_morph_anonymized(monkeypatch, capsys, plain_morph, vae_run: Path, photos, trained_stylizer, tmp_path):
    """By default every frame goes through the egress gate (the test stylizer + dlib verification).

    The gate judges each frame against the un-anonymized frame. The test VAE is briefly trained, so its frames are
    blurry faces that dlib describes alike, and the small test stylizer may not move them past dlib's threshold:
    frames are then withheld, and if all are, nothing is written. Both outcomes are checked for what they must be.
    """
    _, plain = plain_morph
    _, _, stylizer_path = trained_stylizer
    out = tmp_path / "out" / "anon.gif"
    steps = 5  # fewer frames keep the test quick; the ends (alpha 0 and 1) match the plain morph's
    code, err = _facefl_in_process(monkeypatch, capsys, "morph", str(photos[0]), str(photos[1]), "--run",
                                   str(vae_run), "--steps", str(steps), "--out", str(out), "--stylizer",
                                   str(stylizer_path))
    assert "Traceback" not in err
    if code != 0:  # every frame withheld: one error line, nothing written
        assert code == 2 and f"withheld all {steps} frames" in err and "nothing was written" in err, err
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.strip().splitlines()[-1]]
        assert not (tmp_path / "out").exists()
        return
    assert "released through the egress gate" in err and "checkpoint round 1" in err, err
    released, withheld = (int(n) for n in re.search(r"(\d+) released through the egress gate, (\d+) withheld",
                                                    err).groups())
    assert released >= 1 and released + withheld == steps
    anon = _gif_frames(out)
    assert len(anon) == 2 * steps - 2
    assert out.with_name("anon-strip.png").is_file()
    raw = _gif_frames(plain)
    for anon_frame, raw_frame in ((anon[0], raw[0]), (anon[steps - 1], raw[STEPS - 1])):
        assert float(np.abs(anon_frame - raw_frame).mean()) > 10.0  # stylized, or a grey placeholder


def test_withheld_frames_become_placeholders(shared_data):
    """A real gate (MTCNN, a barely-there blur, dlib) withholds frames that still show a recognisable face and
    releases a frame with none (blurred whole); withheld frames become grey placeholders, all withheld is an error."""
    from common.anonymization.anonymizer import Anonymizer, BlurFilter
    from common.anonymization.egress import EgressGate
    from common.anonymization.recognizer import DlibRecognizer
    from server.morph import MorphError, release_frames

    gate = EgressGate(Anonymizer(BlurFilter(0.004), detector=FaceAligner(min_score=0.6)), DlibRecognizer(),
                      site="test", escalate_to=0.0, blank=False)
    face = upscale(Image.open(shared_data / "faces" / "brad_pitt.jpg"), 256)
    no_face = upscale(Image.open(shared_data / "faces" / "no_face_chicago.jpg"), 256)
    frames, released, withheld = release_frames([face, no_face, face], [0.0, 0.5, 1.0], gate)
    assert (released, withheld) == (1, 2) and gate.counts["refused"] == 2
    assert np.array_equal(np.asarray(frames[0]), np.asarray(placeholder(256, alpha=0.0)))
    assert np.array_equal(np.asarray(frames[2]), np.asarray(placeholder(256, alpha=1.0)))
    assert 0 < mse(frames[1], no_face) and frames[1].size == (256, 256)
    with pytest.raises(MorphError, match="withheld all 2 frames"):
        release_frames([face, face], [0.0, 1.0], gate)


# ------------------------------------------------------------------------------------------------ bad input
def _bad_cases(tmp: Path, lfw_photo: Path, shared_data: Path, vae_run: Path, embedding_run: Path) -> dict:
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG " * 20)
    grey = tmp / "grey.png"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(grey)
    not_a_run = tmp / "not-a-run"
    not_a_run.mkdir()
    own = tmp / "own.jpg"
    shutil.copyfile(lfw_photo, own)
    strip_named = tmp / "out-strip.png"
    Image.open(lfw_photo).save(strip_named)
    out = str(tmp / "out" / "m.gif")
    run, good = str(vae_run), str(lfw_photo)
    return {
        "missing image": ([str(tmp / "missing.jpg"), good, "--run", run, "--out", out], "does not exist"),
        "corrupt image": ([good, str(corrupt), "--run", run, "--out", out], "not a readable image"),
        "photo without a face": ([str(shared_data / "faces" / "no_face_chicago.jpg"), good, "--run", run,
                                  "--out", out], "no face found"),
        "grey image": ([good, str(grey), "--run", run, "--out", out], "no face found"),
        "not a run": ([good, good, "--run", str(not_a_run), "--out", out], "not a facefl run directory"),
        "embedding-only run": ([good, good, "--run", str(embedding_run), "--out", out], "--task vae"),
        "one step": ([good, good, "--run", run, "--out", out, "--steps", "1"], "at least 2"),
        "out is an input": ([str(own), good, "--run", run, "--out", str(own)], "would overwrite the input"),
        "strip would overwrite an input": ([str(strip_named), good, "--run", run, "--out", str(tmp / "out.gif")],
                                           "would overwrite the input"),
    }


CASES = ["missing image", "corrupt image", "photo without a face", "grey image", "not a run", "embedding-only run",
         "one step", "out is an input", "strip would overwrite an input"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_nothing_written(case, monkeypatch, capsys, tmp_path, photos, shared_data,
                                                         vae_run, embedding_run):
    args, expected = _bad_cases(tmp_path, photos[0], shared_data, vae_run, embedding_run)[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = _facefl_in_process(monkeypatch, capsys, "morph", *args, "--no-anonymize")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, inputs untouched


def test_bad_input_in_the_real_console_script(tmp_path, photos, vae_run):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(os.urandom(512))
    out = tmp_path / "m.gif"
    proc = subprocess.run([FACEFL, "morph", str(photos[0]), str(corrupt), "--run", str(vae_run), "--out", str(out)],
                          capture_output=True, text=True, timeout=patience(120))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr and "corrupt.jpg" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.jpg"]
