"""dlib's pretrained face ResNet as a federated backbone, on real LFW faces: dlib's own chips, only the trainable
part travels, a frozen trunk runs once per face (its features cached at the site), DP-SGD and the ledger work as
for the other models, a whole federation runs (in-process transport), and `facefl evaluate` scores models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import facefl
from PIL import Image
from inprocess_grid import InProcessGrid

from client.app import make_client_app
from client.privacy import PrivacyLedger
from client.train import DPSettings, cached_trunk_features, split_frozen, train_embedding
from common.config import ConfigError, RunConfig
from common.data.datasets import load_faces
from common.data.dlib_chips import SHAPE_PREDICTOR_FILE
from common.data.sources import EvalData, ProtocolData
from common.dlib_weights import dlib_models_dir
from common.models.federated import EMBEDDING_PREFIX, build_models
from common.models.losses import MarginHead
from server.evaluate import evaluate_embedding, evaluate_protocol, flip_embed
from server.federation import run_federation

dlib = pytest.importorskip("dlib")
PEOPLE = ["Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody", "Al_Gore", "Alejandro_Toledo", "Ali_Naimi"]


def _cfg(lfw_root, cache_dir, tmp_path, **changes) -> RunConfig:
    return RunConfig.from_mapping({"model": "dlib-resnet", "data": str(lfw_root), "cache-dir": str(cache_dir),
                                   "run-dir": str(tmp_path / "run"), **changes})


@pytest.fixture(scope="module")
def chips(lfw_root, cache_dir):
    return load_faces(lfw_root, image_size=150, mode="dlib", identities=PEOPLE, min_images=2, cache_dir=cache_dir,
                      progress=False)


def test_config_reads_dlib_chips_and_refuses_what_cannot_work(lfw_root, cache_dir, tmp_path):
    cfg = _cfg(lfw_root, cache_dir, tmp_path)
    assert (cfg.image_size, cfg.trainable_part, cfg.face_mode) == (150, "projection", "dlib")  # the measured recipe
    assert RunConfig.from_mapping({"model": "compact"}).trainable_part == "all"
    for bad, words in (({"image-size": 112}, "150x150"), ({"task": "both"}, "task=embedding"),
                       ({"loss": "triplet", "dp": False}, "margin softmax")):
        with pytest.raises(ConfigError, match=words):
            _cfg(lfw_root, cache_dir, tmp_path, **bad)
    with pytest.raises(ConfigError, match="trainable=projection applies to model=dlib-resnet"):
        RunConfig.from_mapping({"trainable": "projection"})


def test_chips_are_dlibs_own(lfw_root, chips):
    """load_faces(mode="dlib") cuts exactly the chip dlib's own pipeline cuts from the same pixels (one face in the
    picture; JPEG decoders differ by a few grey levels, so both read the pixels PIL decodes)."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_models_dir() / SHAPE_PREDICTOR_FILE))
    compared = 0
    for i, path in enumerate(chips.paths):
        image = np.asarray(Image.open(lfw_root / path).convert("RGB"))
        faces = detector(image, 1)
        if len(faces) != 1:
            continue
        chip = dlib.get_face_chip(image, predictor(image, faces[0]), size=150, padding=0.25)
        assert np.array_equal(chips.images[i].permute(1, 2, 0).numpy(), chip), path
        compared += 1
    assert compared >= 10 and chips.images.shape[1:] == (3, 150, 150)


def test_only_the_trainable_part_travels(lfw_root, cache_dir, tmp_path):
    last_stage = tuple(f"{EMBEDDING_PREFIX}blocks.{i}." for i in (10, 11, 12, 13))
    for part, count, prefixes in (("last-stage", 4_462_592, last_stage + (EMBEDDING_PREFIX + "projection.",)),
                                  ("projection", 32_768, (EMBEDDING_PREFIX + "projection.",))):
        models = build_models(_cfg(lfw_root, cache_dir, tmp_path, trainable=part))
        sent = models.state_dict()
        assert sum(v.numel() for v in sent.values()) == count
        assert all(k.startswith(prefixes) for k in sent), sorted(sent)[:5]
        moved = {k: v + 0.01 for k, v in sent.items()}
        models.load_state_dict(moved)
        assert all(torch.equal(models.state_dict()[k], moved[k]) for k in moved)
        with pytest.raises(ValueError, match="wrong entries"):  # the frozen part is never accepted in an update
            models.load_state_dict({**moved, EMBEDDING_PREFIX + "stem.conv.weight": torch.zeros(32, 3, 7, 7)})
    whole = build_models(_cfg(lfw_root, cache_dir, tmp_path, trainable="all")).state_dict()
    assert sum(v.numel() for v in whole.values()) == 5_614_592 + 3  # every parameter and dlib's pixel means


def test_dp_fine_tuning_on_cached_trunk_features(lfw_root, cache_dir, tmp_path, chips):
    """The trunk runs once per face (and its mirror); later rounds read its cached features; DP-SGD trains only
    the head, and the frozen trunk does not change."""
    models = build_models(_cfg(lfw_root, cache_dir, tmp_path, trainable="projection"))
    net = models.embedding
    trunk, head = split_frozen(net)
    frozen_before = {k: v.clone() for k, v in trunk.state_dict().items()}
    trained_before = net.projection.weight.detach().clone()
    features_dir = tmp_path / "features"
    margin = MarginHead(128, chips.num_identities)
    res = train_embedding(net, margin, chips, epochs=2, batch_size=8, lr=0.05, dp=DPSettings(1.0, 1.0),
                          feature_cache=features_dir)
    cached = sorted(features_dir.glob("trunk-*/*.pt"))
    assert len(cached) == chips.num_identities  # one file per person
    ((sigma, _, steps),) = res.mechanisms  # one DP-SGD mechanism for the ledger
    assert sigma == 1.0 and steps == res.metrics["steps"] == 2 * -(-len(chips) // 8)
    assert all(torch.equal(frozen_before[k], v) for k, v in trunk.state_dict().items())
    assert not torch.equal(net.projection.weight, trained_before)
    stamps = [f.stat().st_mtime_ns for f in cached]
    features = cached_trunk_features(trunk, chips, features_dir)  # read back, not recomputed
    assert [f.stat().st_mtime_ns for f in cached] == stamps and features.shape[:2] == (len(chips), 2)
    some = chips.by_identity(chips.identities[:2])  # another site's faces of the same people: read, not recomputed
    same_rows = torch.isin(chips.labels, torch.tensor([0, 1]))
    assert torch.equal(cached_trunk_features(trunk, some, features_dir), features[same_rows])
    assert [f.stat().st_mtime_ns for f in cached] == stamps
    with torch.no_grad():
        x = chips.images[:4].float().div(255).mul(2).sub(1)
        assert torch.allclose(head(features[:4, 0]), net(x), atol=1e-5)
        assert torch.allclose(head(features[:4, 1]), net(x.flip(-1)), atol=1e-5)


def test_server_evaluation_with_a_cached_trunk_equals_the_full_model(lfw_root, cache_dir, tmp_path, chips):
    net = build_models(_cfg(lfw_root, cache_dir, tmp_path, trainable="last-stage")).embedding
    labels = chips.labels
    a = torch.arange(0, len(chips) - 1)
    b = a + 1
    data = EvalData(chips.images[a], chips.images[b], labels[a] == labels[b], chips.images[:4], "test pairs")
    cached = evaluate_embedding(net, data)
    assert len(data.cache) == 2  # the trunk ran once for each side of the pairs
    for p in net.parameters():
        p.requires_grad_(True)  # a model that trains all of itself: the plain full forward
    assert split_frozen(net) is None
    full = evaluate_embedding(net, data)
    assert cached == pytest.approx(full, abs=1e-6)
    assert evaluate_embedding(net, data) == pytest.approx(full, abs=1e-6)


def test_protocol_metrics_on_real_faces(lfw_root, cache_dir, tmp_path, chips):
    """dlib's pretrained backbone tells these people apart: rank-1 and verification on real LFW faces."""
    net = build_models(_cfg(lfw_root, cache_dir, tmp_path)).embedding.eval()
    labels = chips.labels
    firsts = [torch.nonzero(labels == k).flatten() for k in range(chips.num_identities)]
    same_a = torch.stack([f[0] for f in firsts])
    same_b = torch.stack([f[1] for f in firsts])
    diff_b = torch.roll(same_b, 1)
    protocol = ProtocolData(chips, torch.cat([same_a, same_a]), torch.cat([same_b, diff_b]),
                            torch.tensor([True] * len(firsts) + [False] * len(firsts)), same_a, same_b, "test")
    metrics = evaluate_protocol(net, protocol)
    cached = evaluate_protocol(net, protocol, feature_cache=tmp_path / "features")  # the frozen trunk's features
    assert cached == pytest.approx(metrics, abs=1e-6, nan_ok=True) and list((tmp_path / "features").glob("*/*.pt"))
    assert evaluate_protocol(net, protocol, feature_cache=tmp_path / "features") == pytest.approx(cached, nan_ok=True)
    assert metrics["rank1"] == 1.0 and metrics["roc_auc"] == 1.0 and metrics["accuracy"] >= 0.9
    assert metrics["impostor_pairs"] > 20 and np.isnan(metrics["tar@far=1e-3"])  # too few impostors for 1e-3
    emb = flip_embed(net, chips.images)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(chips)), atol=1e-5)


@pytest.mark.slow
def test_a_dp_federation_fine_tunes_dlibs_backbone(lfw_root, cache_dir, tmp_path):
    """Two sites, one round, DP: Flower's server loop and real ClientApps (in-process transport). The global model
    is dlib's network with a new projection; the frozen trunk was never sent; each site's ledger accounts it."""
    cfg = _cfg(lfw_root, cache_dir, tmp_path, **{
        "num-rounds": 1, "min-sites": 2, "dp": True, "target-epsilon": 50, "accountant": "rdp", "batch-size": 16,
        "max-identities": 12, "eval-pairs": 40, "trainable": "projection", "lr": 0.01, "round-timeout": 600})
    nodes = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}
    grid = InProcessGrid(make_client_app(), nodes, cfg.to_mapping())
    run = run_federation(grid, cfg)
    replies = [reply for _, reply in grid.exchanges if reply is not None and reply.content.array_records]
    assert len(replies) == 2
    for reply in replies:
        (arrays,) = reply.content.array_records.values()
        assert sorted(arrays) == [EMBEDDING_PREFIX + "projection.weight"]  # 32,768 numbers, nothing frozen
    metrics = json.loads((run / "metrics.json").read_text())
    first, last = metrics["rounds"][0]["global"], metrics["rounds"][-1]["global"]
    assert first["embedding/accuracy"] >= 0.85 and last["embedding/accuracy"] >= 0.85
    for site in ("site-0", "site-1"):
        ledger = PrivacyLedger.load(run / "sites" / site)
        assert 0 < ledger.spent <= 50 and [r["status"] for r in ledger.rounds] == ["trained"]
    assert list((cache_dir / "features").glob("trunk-*/*.pt"))  # the trunk's features, beside the face crops


def test_evaluate_command_writes_its_figures(tmp_path):
    out = tmp_path / "eval.json"
    done = facefl("evaluate", "--model", "compact", "--json", str(out), "--set", "eval-pairs=200")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["evaluated"] == "compact with no training" and result["data"] == "synthetic"
    assert {"accuracy", "roc_auc", "tar@far=1e-2", "tar@far=1e-3", "rank1"} <= set(result["metrics"])
    assert "accuracy" in done.stdout and "rank-1" in done.stdout
    refused = facefl("evaluate")
    assert refused.returncode != 0 and "Give a run directory" in refused.stderr
