"""The anonymization pipeline, the egress gate and ``facefl anonymize`` on real photos, with a really trained
(small) stylizer, MTCNN and dlib's recognizer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import patience
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from PIL import Image

from common.anonymization.anonymizer import (Anonymizer, BlurFilter, PixelateFilter, StyleFilter, WholeImageStyle,
                                             pil_to_tensor)
from common.anonymization.egress import (EgressGate, EgressRefused, EgressViolation, array_signature, check_reply,
                                         images_records)
from common.anonymization.recognizer import DlibRecognizer
from common.anonymization.styles import load_stylizer
from common.data.preprocess import FaceAligner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def detector() -> FaceAligner:
    return FaceAligner(min_score=0.6)


@pytest.fixture(scope="session")
def recognizer() -> DlibRecognizer:
    return DlibRecognizer()


@pytest.fixture()
def anonymizer(trained_stylizer, detector) -> Anonymizer:
    model, meta, _ = trained_stylizer
    return Anonymizer(StyleFilter(model, work_size=meta["work_size"]), whole_image=WholeImageStyle(model),
                      detector=detector)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _box_change(a: Image.Image, b: Image.Image, box) -> tuple[float, float]:
    """Mean absolute pixel change inside ``box`` and in the image's outer 8% border."""
    x = pil_to_tensor(a) - pil_to_tensor(b)
    x1, y1, x2, y2 = (int(v) for v in box)
    inside = x[:, y1:y2, x1:x2].abs().mean().item()
    h, w = x.shape[-2:]
    m = max(2, int(0.08 * min(h, w)))
    border = torch.cat([x[:, :m].flatten(), x[:, -m:].flatten()]).abs().mean().item()
    return inside, border


@pytest.mark.parametrize("name", ["brad_pitt.jpg", "lenna.jpg"])
def test_faces_found_and_changed_locally(anonymizer, faces_dir, name):
    img = _open(faces_dir / name)
    result = anonymizer(img)
    assert result.action == "faces" and not result.no_face and len(result.faces) >= 1
    assert result.image.size == img.size and result.image.mode == "RGB"
    face = max(result.faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    assert face.score >= 0.6 and face.landmarks.shape == (5, 2)
    inside, border = _box_change(result.image, img, face.box)
    assert inside > 0.05, f"face region barely changed ({inside:.3f})"
    # The feathered mask keeps the change on the face: the image border top and bottom stays nearly intact.
    assert border < inside / 3


def test_strength_trades_change(anonymizer, faces_dir):
    img = _open(faces_dir / "brad_pitt.jpg")
    full, half = anonymizer(img, strength=1.0), anonymizer(img, strength=0.4)
    box = full.faces[0].box
    assert _box_change(half.image, img, box)[0] < 0.7 * _box_change(full.image, img, box)[0]
    with pytest.raises(ValueError, match="strength"):
        anonymizer(img, strength=0.0)


def test_no_face_fails_closed(anonymizer, faces_dir, trained_stylizer, detector):
    img = _open(faces_dir / "no_face_chicago.jpg")
    result = anonymizer(img)
    assert result.no_face and result.action == "whole-image" and result.image is not None
    whole = (pil_to_tensor(result.image) - pil_to_tensor(img)).abs()
    assert whole.mean() > 0.05  # everything stylized, corners included
    assert whole[:, :20, :20].mean() > 0.03 and whole[:, -20:, -20:].mean() > 0.03
    model, meta, _ = trained_stylizer
    refusing = Anonymizer(StyleFilter(model, work_size=64), detector=detector, no_face="refuse")
    refused = refusing(img)
    assert refused.refused and refused.image is None and refused.faces == ()
    assert refusing.stats["refused"] == 1
    passing = Anonymizer(StyleFilter(model, work_size=64), detector=detector, no_face="pass")(img)
    assert passing.action == "passed" and np.array_equal(np.asarray(passing.image), np.asarray(img))


def test_grayscale_tiny_and_huge_images(anonymizer, faces_dir):
    gray = _open(faces_dir / "lenna.jpg").convert("L")
    result = anonymizer(gray)
    assert result.image.mode == "L" and result.image.size == gray.size and len(result.faces) >= 1
    tiny = Image.new("RGB", (9, 7), (120, 90, 60))
    tiny_result = anonymizer(tiny)
    assert tiny_result.action == "whole-image" and tiny_result.image.size == (9, 7)
    big = _open(faces_dir / "brad_pitt.jpg")
    big = big.resize((big.width * 4, big.height * 4), Image.Resampling.BILINEAR)  # detection runs downscaled
    big_result = anonymizer(big)
    assert big_result.image.size == big.size and len(big_result.faces) >= 1
    box = big_result.faces[0].box
    assert box[2] - box[0] > 200  # the box is in full-resolution coordinates


def test_gate_releases_anonymized_and_refuses_recognizable(faces_dir, detector, recognizer):
    img = _open(faces_dir / "brad_pitt.jpg")
    # A barely-there blur leaves the person recognizable: refused, counted, not returned.
    # (Every attempt, the second pass included, leaves it matched; without blanking it is withheld.)
    weak = EgressGate(Anonymizer(BlurFilter(0.004), detector=detector, strength=1.0), recognizer, site="a",
                      blank=False)
    with pytest.raises(EgressRefused, match="still matches") as refused:
        weak.release(img, purpose="test")
    assert refused.value.refusal.reason == "source-match" and refused.value.refusal.distance < 0.6
    assert weak.counts == {"released": 0, "refused": 1, "faces": 0, "retried": 1}
    assert weak.events[-1]["released"] is False and weak.events[-1]["reid"][0] < DlibRecognizer.THRESHOLD
    # With blanking (the default), the face every attempt left recognisable is blanked: the image leaves without it.
    blanking = EgressGate(Anonymizer(BlurFilter(0.004), detector=detector, strength=1.0), recognizer, site="a")
    blanked = blanking.release(img, purpose="test")
    assert blanked.attempt == "blanked" and "blanked" in blanked.result.message
    box = [int(v) for v in blanked.result.faces[0].box]
    face = np.asarray(blanked.pixels, np.float32)[box[1] + 10:box[3] - 10, box[0] + 10:box[2] - 10]
    assert face.std(axis=(0, 1)).max() < 3.0  # one flat colour where the face was
    # Coarse pixelation of the face region is no longer matched: released with a valid seal.
    strong = EgressGate(Anonymizer(PixelateFilter(5), detector=detector), recognizer, site="a")
    released = strong.release(img, purpose="test")
    assert released.verify() and released.result.faces and not released.result.any_matched
    assert released.result.faces[0].reid_distance >= DlibRecognizer.THRESHOLD
    with pytest.raises(ValueError, match="recognizer"):
        EgressGate(Anonymizer(PixelateFilter(5), detector=detector), None)


def _model_record() -> tuple[ArrayRecord, dict]:
    state = {"embedding.w": torch.randn(4, 3), "vae.b": torch.zeros(5)}
    record = ArrayRecord(state)
    return record, array_signature(record)


def test_replies_with_raw_faces_are_rejected(faces_dir, detector, recognizer):
    img = _open(faces_dir / "lenna.jpg")
    raw = np.asarray(img, dtype=np.uint8)
    model, sent = _model_record()
    metrics = MetricRecord({"num-examples": 3})
    # A plain model update passes.
    check_reply(RecordDict({"arrays": model, "metrics": metrics}), sent_arrays=sent)
    # A raw face as "images" without seals, with a forged seal, smuggled into the model update, or under another
    # record name: all rejected.
    raw_images = ArrayRecord({"image-0": Array(raw)})
    with pytest.raises(EgressViolation, match="seal"):
        check_reply(RecordDict({"arrays": model, "images": raw_images}), sent_arrays=sent)
    with pytest.raises(EgressViolation, match="not released"):
        check_reply(RecordDict({"arrays": model, "images": raw_images,
                                "image-seals": ConfigRecord({"image-0": "0" * 64})}), sent_arrays=sent)
    smuggled = ArrayRecord({**{k: model[k] for k in model.keys()}, "face": Array(raw)})
    with pytest.raises(EgressViolation, match="differ"):
        check_reply(RecordDict({"arrays": smuggled}), sent_arrays=sent)
    reshaped = ArrayRecord({"embedding.w": Array(np.zeros((4, 3), np.uint8)), "vae.b": model["vae.b"]})
    with pytest.raises(EgressViolation, match="embedding.w"):
        check_reply(RecordDict({"arrays": reshaped}), sent_arrays=sent)
    with pytest.raises(EgressViolation, match="Unexpected"):
        check_reply(RecordDict({"arrays": model, "samples": raw_images}), sent_arrays=sent)
    # Images released by the gate pass; a released image altered afterwards does not.
    gate = EgressGate(Anonymizer(PixelateFilter(5), detector=detector), recognizer)
    released = gate.release(img, purpose="report sample")
    images, seals = images_records([released])
    check_reply(RecordDict({"arrays": model, "images": images, "image-seals": seals}), sent_arrays=sent)
    tampered = np.array(released.pixels)
    tampered[0, 0, 0] ^= 1
    with pytest.raises(EgressViolation):
        check_reply(RecordDict({"arrays": model, "images": ArrayRecord({"image-0": Array(tampered)}),
                                "image-seals": seals}), sent_arrays=sent)
    with pytest.raises(EgressViolation):
        images_records([raw])


def test_stylizer_file_checks(trained_stylizer, tmp_path):
    from common.anonymization.styles import StyleError

    _, meta, path = trained_stylizer
    copy = tmp_path / "s.pt"
    copy.write_bytes(Path(path).read_bytes()[:-100])  # truncated weights
    Path(copy.with_suffix(".json")).write_text(Path(path).with_suffix(".json").read_text())
    with pytest.raises(StyleError, match="SHA-256"):
        load_stylizer(copy)
    with pytest.raises(StyleError, match="missing"):
        load_stylizer(tmp_path / "nothing.pt")


def test_export_round_trip(trained_stylizer, tmp_path):
    from server.stylizers import export_stylizer

    model, meta, _ = trained_stylizer
    written = export_stylizer(model, meta, tmp_path / "export")
    assert written["torchscript_max_abs_diff"] < 1e-5
    assert written["onnx_max_abs_diff"] < 1e-4
    scripted = torch.jit.load(written["torchscript"])
    x = torch.rand(2, 3, 72, 60)  # another size and batch than exported with
    with torch.inference_mode():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
    import onnxruntime as ort

    session = ort.InferenceSession(written["onnx"], providers=["CPUExecutionProvider"])
    y = session.run(None, {"image": x.numpy()})[0]
    assert y.shape == (2, 3, 72, 60) and np.abs(y - model(x).detach().numpy()).max() < 1e-4


def _said(proc: subprocess.CompletedProcess) -> str:
    """stderr with the console's line wrapping undone (it wraps long paths at the terminal width)."""
    return " ".join(proc.stderr.split())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_anonymize_files(trained_stylizer, faces_dir, tmp_path):
    _, _, stylizer_path = trained_stylizer
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("brad_pitt.jpg", "no_face_chicago.jpg"):
        (inputs / name).write_bytes((faces_dir / name).read_bytes())
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (inputs / "notes.txt").write_text("not an image, ignored")
    before = {p.name: _digest(p) for p in inputs.iterdir()}
    out = tmp_path / "out"
    env = {**os.environ, "FACEFL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "anonymize", str(inputs), "--out", str(out),
                           "--stylizer", str(stylizer_path), "--method", "pixelate"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=patience(300))
    assert proc.returncode == 1, proc.stderr  # one unreadable file: reported, the others written
    assert {p.name: _digest(p) for p in inputs.iterdir()} == before  # inputs untouched
    report = json.loads((out / "anonymize-report.json").read_text())
    by_name = {Path(f["source"]).name: f for f in report["files"]}
    assert by_name["broken.jpg"]["status"] == "error" and "not a readable image" in by_name["broken.jpg"]["message"]
    assert by_name["brad_pitt.jpg"]["status"] == "anonymized" and by_name["brad_pitt.jpg"]["faces"]
    assert by_name["brad_pitt.jpg"]["faces"][0]["reid_distance"] >= DlibRecognizer.THRESHOLD
    assert by_name["no_face_chicago.jpg"]["status"] == "whole-image"
    written = out / "in" / "brad_pitt.jpg"
    assert written.is_file() and _digest(written) != before["brad_pitt.jpg"]
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    assert "broken.jpg" in _said(proc) and "refused" in _said(proc)
    # Output folder equal to the input folder: nothing is overwritten.
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "anonymize", str(inputs / "brad_pitt.jpg"),
                           "--out", str(inputs), "--method", "pixelate"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=patience(300))
    assert proc.returncode == 1 and "overwrite an input" in _said(proc)
    assert _digest(inputs / "brad_pitt.jpg") == before["brad_pitt.jpg"]
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "anonymize", str(tmp_path / "missing.jpg"),
                           "--out", str(out), "--method", "blur"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=patience(300))
    assert proc.returncode != 0 and "no such file" in _said(proc)


def test_many_faces_in_one_image(anonymizer, lfw_root):
    people = sorted(p for p in lfw_root.iterdir() if p.is_dir())[:40:10]  # four different people
    tiles = [_open(sorted(p.glob("*.jpg"))[0]) for p in people]
    collage = Image.new("RGB", (500, 500))
    for i, tile in enumerate(tiles):
        collage.paste(tile, ((i % 2) * 250, (i // 2) * 250))
    result = anonymizer(collage)
    assert result.action == "faces" and len(result.faces) >= 4
    for i in range(4):  # every person's face centre is changed
        cx, cy = (i % 2) * 250 + 125, (i // 2) * 250 + 125
        assert _box_change(result.image, collage, (cx - 30, cy - 30, cx + 30, cy + 30))[0] > 0.05


def test_gatys_method_in_the_pipeline(faces_dir, detector, shared_data):
    from common.anonymization.anonymizer import GatysFilter
    from server.stylizers import load_style_image

    style = load_style_image(shared_data / "styles" / "neural-style" / "starry_night.jpg")
    img = _open(faces_dir / "brad_pitt.jpg")
    img = img.resize((img.width // 2, img.height // 2))
    result = Anonymizer(GatysFilter(style, steps=8, work_size=48, style_weight=30.0), detector=detector)(img)
    assert result.action == "faces"
    assert _box_change(result.image, img, result.faces[0].box)[0] > 0.02
