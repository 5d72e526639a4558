"""``facefl bench train``: what DP costs, and how federated training compares with centralized, on LFW View 1.

1. DP cost: images/s of a DP-SGD step over a non-DP step, same model, same batch, measured side by side
   (interleaved repetitions, median), since the machine is shared and noisy.
2. LFW View 1: train on the ``peopleDevTrain.txt`` identities with at least two images; verification accuracy
   and ROC AUC on ``pairsDevTest.txt`` for centralized non-DP, federated non-DP and federated DP, each with the
   same number of passes over the data (rounds x local epochs = epochs), in one table with wall-clock times.
3. VAE: PSNR/SSIM on held-out LFW faces at 64x64, federated non-DP and DP.

Every figure is printed and written to ``<out>/bench.json``.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from client.train import DPSettings, EmbeddingClassifier, _privatize, normalize, quiet_opacus, train_embedding
from common.atomic import atomic_write_json
from common.config import RunConfig
from common.data.datasets import load_faces
from common.data.sources import eval_data, training_identities
from common.models.embedding import build_embedding_model
from common.models.federated import build_models
from common.models.losses import MarginHead, margin_softmax_loss
from server.evaluate import evaluate_embedding


def _side_by_side(make, x: torch.Tensor, labels: torch.Tensor, repeats: int) -> dict:
    """Median images/s of one step of ``make(False)`` (plain) and ``make(True)`` (DP-SGD), same batch, interleaved
    (the machine is shared and noisy); ``make`` returns ``(model, optimizer)``."""
    def step(model, opt) -> float:
        t = time.perf_counter()
        with quiet_opacus():
            opt.zero_grad(set_to_none=True)
            margin_softmax_loss(model(x), labels, kind="arcface", margin=0.3, scale=30.0).backward()
            opt.step()
        return time.perf_counter() - t

    plain, private = make(False), make(True)
    for pair in (plain, private):  # warm-up
        step(*pair)
    t_plain, t_dp = [], []
    for _ in range(repeats):
        t_plain.append(step(*plain))
        t_dp.append(step(*private))
    plain_ips, dp_ips = len(x) / statistics.median(t_plain), len(x) / statistics.median(t_dp)
    return {"batch_size": len(x), "non_dp_images_per_s": plain_ips, "dp_images_per_s": dp_ips,
            "dp_slowdown": plain_ips / dp_ips}


def _private(model, opt, x: torch.Tensor, labels: torch.Tensor):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=len(x))
    model, opt, _ = _privatize(model, opt, loader, DPSettings(1.0, 1.0), torch.Generator().manual_seed(0))
    return model, opt


def dp_cost(faces_images: torch.Tensor, *, batch_size: int = 64, repeats: int = 5, image_size: int = 64) -> dict:
    """Median images/s of one training step of the compact model with and without DP-SGD (same batch)."""
    torch.manual_seed(0)
    x = normalize(faces_images[:batch_size].float().div(255.0))
    labels = torch.arange(batch_size) % 16

    def make(dp: bool):
        model = EmbeddingClassifier(build_embedding_model("compact", embedding_dim=128, dp=True), MarginHead(128, 16))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return _private(model, opt, x, labels) if dp else (model, opt)

    return {**_side_by_side(make, x, labels, repeats), "image_size": image_size}


def dp_cost_finetune(faces_images: torch.Tensor, *, part: str = "projection", batch_size: int = 256,
                     repeats: int = 5) -> dict:
    """Median images/s of one fine-tuning step of dlib's pretrained backbone (``part`` trains, on precomputed trunk
    features, as a site trains it) with and without DP-SGD (same batch)."""
    from client.train import split_frozen, trunk_features

    torch.manual_seed(0)
    labels = torch.arange(batch_size) % 64
    net = build_models(RunConfig(model="dlib-resnet", trainable=part)).embedding
    trunk, _ = split_frozen(net)
    x = trunk_features(trunk, faces_images[torch.arange(batch_size) % len(faces_images)])

    def make(dp: bool):
        fresh = build_models(RunConfig(model="dlib-resnet", trainable=part)).embedding
        model = EmbeddingClassifier(split_frozen(fresh)[1], MarginHead(128, 64))
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01)
        return _private(model, opt, x, labels) if dp else (model, opt)

    return {**_side_by_side(make, x, labels, repeats), "part": part}


def centralized(cfg: RunConfig, epochs: int, console: Console) -> dict:
    """Non-DP training on all training identities pooled in one place, evaluated like the federation."""
    names = training_identities(cfg)
    faces = load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=names, min_images=2,
                       cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, progress=True)
    models = build_models(cfg)
    head = MarginHead(cfg.embedding_dim, faces.num_identities)
    data = eval_data(cfg)
    start = time.perf_counter()
    history = []
    for epoch in range(1, epochs + 1):
        res = train_embedding(models.embedding, head, faces, epochs=1, batch_size=cfg.batch_size, lr=cfg.lr,
                              loss=cfg.loss, margin=cfg.margin, scale=cfg.scale, augment=cfg.augment, dp=None,
                              seed=cfg.seed + epoch)
        metrics = evaluate_embedding(models.embedding, data)
        history.append({"epoch": epoch, "train-loss": res.metrics["train-loss"], **metrics})
        console.print(f"centralized epoch {epoch}/{epochs}: loss {res.metrics['train-loss']:.3f} "
                      f"acc {metrics['accuracy']:.3f} auc {metrics['roc_auc']:.3f}")
    return {"accuracy": history[-1]["accuracy"], "roc_auc": history[-1]["roc_auc"],
            "seconds": time.perf_counter() - start, "history": history, "examples": len(faces),
            "identities": faces.num_identities}


def federated(cfg: RunConfig, sites: int, out: Path, name: str, console: Console) -> dict:
    from simulations.simulate import prepare_config, simulate

    run_cfg = prepare_config(cfg, num_sites=sites, out=str(out / name))
    start = time.perf_counter()
    run_dir = simulate(run_cfg, sites)
    seconds = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["rounds"][-1]["global"]
    eps = [p.get("epsilon", 0.0) for p in metrics.get("privacy", {}).values()]
    result = {"seconds": seconds, "run_dir": str(run_dir), "max_epsilon": max(eps) if eps else 0.0,
              "history": [{"round": r["round"], **r["global"]} for r in metrics["rounds"]]}
    for key in ("embedding/accuracy", "embedding/roc_auc", "vae/psnr", "vae/ssim"):
        if key in last:
            result[key.split("/")[1] if key.startswith("embedding") else key.replace("/", "_")] = last[key]
    console.print(f"{name}: {result}")
    return result


def run_bench(*, data: str, rounds: int, sites: int, epsilon: float, max_identities: int, parts: list[str],
              out: Path, console: Console, batch_size: int = 256) -> dict:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(data).expanduser().resolve())
    report: dict = {"data": data, "rounds": rounds, "sites": sites, "epsilon": epsilon, "torch_threads":
                    torch.get_num_threads(), "batch_size": batch_size}
    # One batch size for every training run, DP or not: DP-SGD wants large batches (the noise on the averaged
    # gradient shrinks as 1/batch), and large batches also keep federated sites from drifting apart in a round.
    base = RunConfig(data=data, num_rounds=rounds, max_identities=max_identities, task="embedding",
                     batch_size=batch_size)
    warnings.filterwarnings("ignore", message=".*Secure RNG.*")

    if "dp-cost" in parts:
        faces = load_faces(data, image_size=64, identities=training_identities(base)[:40], min_images=2,
                           progress=False)
        report["dp_cost"] = dp_cost(faces.images)
        d = report["dp_cost"]
        console.print(f"DP cost (compact model, batch {d['batch_size']}, 64x64): non-DP "
                      f"{d['non_dp_images_per_s']:.1f} img/s, DP {d['dp_images_per_s']:.1f} img/s, "
                      f"DP is {d['dp_slowdown']:.2f}x slower")
        chips = load_faces(data, image_size=150, mode="dlib", identities=training_identities(base)[:40], min_images=2,
                           progress=False)
        for part in ("projection", "last-stage"):
            f = report[f"dp_cost_finetune_{part}"] = dp_cost_finetune(chips.images, part=part)
            console.print(f"DP cost of fine-tuning dlib's backbone ({part} trains, on its cached trunk features, "
                          f"batch {f['batch_size']}): non-DP {f['non_dp_images_per_s']:.0f} img/s, DP "
                          f"{f['dp_images_per_s']:.0f} img/s, DP is {f['dp_slowdown']:.2f}x slower (goal <= 1.5x)")
        atomic_write_json(out / "bench.json", report)

    if "view1" in parts:
        view1 = {}
        view1["centralized non-DP"] = centralized(base.replace(dp=False), rounds, console)
        atomic_write_json(out / "bench.json", {**report, "view1": view1})
        view1["federated non-DP"] = federated(base.replace(dp=False), sites, out, "fed-nodp", console)
        atomic_write_json(out / "bench.json", {**report, "view1": view1})
        view1[f"federated DP eps={epsilon:g}"] = federated(base.replace(dp=True, target_epsilon=epsilon), sites, out,
                                                            "fed-dp", console)
        report["view1"] = view1
        table = Table(title=f"LFW View 1 (pairsDevTest), {sites} sites, {rounds} rounds x 1 local epoch "
                            f"(centralized: same number of epochs), batch {batch_size}")
        for col in ("setting", "verification accuracy", "ROC AUC", "max site epsilon", "wall-clock s"):
            table.add_column(col)
        for name, r in view1.items():
            table.add_row(name, f"{r['accuracy']:.3f}", f"{r['roc_auc']:.3f}",
                          f"{r.get('max_epsilon', 0.0):.2f}" if "DP eps" in name else "-", f"{r['seconds']:.0f}")
        console.print(table)
        atomic_write_json(out / "bench.json", report)

    if "vae" in parts:
        vae_cfg = base.replace(task="vae")
        vae = {"federated non-DP": federated(vae_cfg.replace(dp=False), sites, out, "vae-nodp", console),
               f"federated DP eps={epsilon:g}": federated(vae_cfg.replace(dp=True, target_epsilon=epsilon), sites,
                                                           out, "vae-dp", console)}
        report["vae"] = vae
        table = Table(title=f"VAE on held-out LFW faces (peopleDevTest), 64x64, {sites} sites, {rounds} rounds")
        for col in ("setting", "PSNR dB", "SSIM", "max site epsilon", "wall-clock s"):
            table.add_column(col)
        for name, r in vae.items():
            table.add_row(name, f"{r['vae_psnr']:.2f}", f"{r['vae_ssim']:.3f}",
                          f"{r['max_epsilon']:.2f}" if "non-DP" not in name else "-",
                          f"{r['seconds']:.0f}")
        console.print(table)
        atomic_write_json(out / "bench.json", report)
    console.print(f"wrote {out / 'bench.json'}")
    return report
