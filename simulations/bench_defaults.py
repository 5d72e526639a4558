"""``facefl bench train --parts default,never-worse``: what a user's own command gives, and that no setting of the
pretrained backbone ends below where it started.

- ``default``: the model ``facefl simulate --data DATA`` trains, with no training (zero-shot), then that very command
  with its defaults (the same functions the command calls: ``config_from_options`` -> ``prepare_config`` ->
  ``simulate``), scored on View 1 and on LFW's untouched test people (no View-1 pair names them: no setting was
  chosen on them).
- ``masked``: the masked domain (``common.data.masks``): zero-shot, centralized non-DP fine-tuning and 4-site federated
  DP at each epsilon, the sites' faces (and the server's validation people) masked with probability one half; each
  scored on View 1's masked-masked pairs, masked-unmasked pairs (a masked probe against an unmasked gallery) and
  the original pairs.
- ``never-worse``: every ``trainable`` part of dlib's backbone (projection, last-stage, all) at its default learning
  rate and batch, DP at each epsilon, for each number of sites: the final model against zero-shot on View 1, with the
  rounds the server's guard rejected.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.atomic import atomic_write_json
from common.config import RunConfig
from common.data.datasets import load_faces
from common.data.sources import (ProtocolData, masked, masked_protocols, protocol_data, training_identities,
                                 untouched_protocol)
from common.models.federated import build_models
from server.evaluate import evaluate_protocol
from server.rundir import load_run_models
from simulations.simulate import config_from_options, prepare_config, simulate

TRAINABLES = ("projection", "last-stage", "all")


def _score(model, protocols: dict[str, ProtocolData]) -> dict:
    """``facefl evaluate``'s metrics on each protocol; a frozen trunk's features are computed once per face and kept
    in the face cache's features folder (the same features a site and the server compute)."""
    from client.site import FEATURES_DIR
    from common.weights import default_cache_dir

    features = default_cache_dir() / FEATURES_DIR
    return {name: evaluate_protocol(model.eval(), p, feature_cache=features) for name, p in protocols.items()}


def _protocols(cfg) -> dict[str, ProtocolData]:
    protocols = {"view1": protocol_data(cfg)}
    untouched = untouched_protocol(cfg)
    if untouched is not None:
        protocols["untouched"] = untouched
    return protocols


def user_run(options: dict, sets: dict, sites: int | None, out: Path, name: str, protocols: dict,
             console: Console, headline: str = "view1") -> dict:
    """``facefl simulate`` with ``options`` and ``--set`` pairs ``sets`` (None: the command's default sites), as the
    command runs it, then its final model scored on each protocol. A finished run in ``out/name`` is read back."""
    cfg, num_sites = config_from_options(options, sets=sets, sites=sites)
    run_dir = out / name
    metrics_file = run_dir / "metrics.json"
    done = metrics_file.exists() and json.loads(metrics_file.read_text()).get("run", {}).get("status") == "completed"
    start = time.perf_counter()
    if not done:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        simulate(prepare_config(cfg, num_sites=num_sites, out=str(run_dir)), num_sites)
    metrics = json.loads(metrics_file.read_text())
    rounds = metrics["rounds"]
    _, models, _ = load_run_models(str(run_dir))
    eps = [p.get("epsilon", 0.0) for p in metrics.get("privacy", {}).values()]
    rejected = [r["round"] for r in rounds if not r.get("guard", {}).get("kept", True)]
    row = {"scores": _score(models.embedding, protocols), "sites": num_sites, "rounds": cfg.num_rounds,
           "rejected_rounds": rejected, "max_epsilon": max(eps) if eps else 0.0, "run_dir": str(run_dir),
           "seconds": time.perf_counter() - start if not done else metrics.get("run", {}).get("seconds"),
           "settings": {k: cfg.to_mapping()[k] for k in ("model", "trainable", "batch-size", "lr", "backbone-lr",
                                                         "target-epsilon", "dp", "num-rounds")}}
    v1 = row["scores"][headline]
    console.print(f"  {name}: {headline} accuracy {v1['accuracy']:.3f}, AUC {v1['roc_auc']:.4f}; rejected rounds "
                  f"{rejected or 'none'}")
    return row


def run_default_bench(*, data: str, epsilons: tuple[float, ...], site_counts: tuple[int, ...],
                      trainables: tuple[str, ...], parts: list[str], out: Path, console: Console,
                      report: dict) -> dict:
    """The ``default`` and ``never-worse`` parts (see the module docstring); figures go into ``report``."""
    cfg, _ = config_from_options({"data": data})
    protocols = _protocols(cfg)
    zero = _score(build_models(cfg).embedding, protocols)
    report["zero_shot"] = {"model": cfg.model, "scores": zero}
    console.print(f"zero-shot {cfg.model}: View 1 accuracy {zero['view1']['accuracy']:.3f}"
                  + (f", untouched people {zero['untouched']['accuracy']:.3f}" if "untouched" in zero else ""))
    if "default" in parts:
        console.print(f"[bold]facefl simulate --data {data}[/bold] (every other setting at its default)")
        report["default"] = user_run({"data": data}, {}, None, out, "default", protocols, console)
        atomic_write_json(out / "bench.json", report)
        console.print(default_table(report))
    if "never-worse" in parts:
        rows = report.setdefault("never_worse", {})
        for part in trainables:
            for eps in epsilons:
                for sites in site_counts:
                    name = f"{part}-eps{eps:g}-{sites}sites"
                    console.print(f"[bold]{name}[/bold]: facefl simulate --data DATA --sites {sites} --epsilon {eps:g} "
                                  f"--set trainable={part}")
                    rows[name] = {"trainable": part, "epsilon": eps, **user_run(
                        {"data": data, "target-epsilon": eps}, {"trainable": part}, sites, out, name, protocols,
                        console)}
                    atomic_write_json(out / "bench.json", report)
        console.print(never_worse_table(report))
    return report


MASK_PROBABILITY = 0.5


def centralized_masked(cfg: RunConfig, console: Console) -> tuple:
    """Non-DP fine-tuning on every site's people pooled, faces masked as the sites' are, one epoch per round of
    ``cfg`` with the sites' own settings (``client.site.embedding_settings``); returns (model, seconds)."""
    from client.site import embedding_settings
    from client.train import train_embedding
    from common.models.losses import MarginHead

    cfg = cfg.replace(dp=False)
    faces = load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=training_identities(cfg),
                       min_images=2, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, progress=True)
    faces = masked(cfg, faces)
    models = build_models(cfg)
    head = MarginHead(cfg.embedding_dim, faces.num_identities)
    start, res = time.perf_counter(), None
    for epoch in range(1, cfg.num_rounds + 1):
        res = train_embedding(models.embedding, head, faces, dp=None, seed=cfg.seed + epoch,
                              optimizer_state=res.optimizer_state if res is not None else None,
                              **{**embedding_settings(cfg, epoch), "epochs": 1})
        console.print(f"  centralized epoch {epoch}/{cfg.num_rounds}: loss {res.metrics['train-loss']:.3f}")
    return models.embedding, time.perf_counter() - start


def run_masked_bench(*, data: str, epsilons: tuple[float, ...], sites: int, sets: dict, out: Path,
                     console: Console, report: dict) -> dict:
    """The ``masked`` part (see the module docstring); ``sets`` are further run-config values of every trained row."""
    options = {"data": data, "mask-probability": MASK_PROBABILITY}
    cfg, _ = config_from_options(options, sets=sets)
    protocols = masked_protocols(cfg, protocol_data(cfg))
    rows = report.setdefault("masked", {})
    rows["zero-shot"] = {"scores": _score(build_models(cfg).embedding, protocols)}
    console.print(masked_table(rows))
    if "centralized non-DP" not in rows:
        model, seconds = centralized_masked(cfg, console)
        rows["centralized non-DP"] = {"scores": _score(model, protocols), "seconds": seconds}
        atomic_write_json(out / "bench.json", report)
    for eps in epsilons:
        name = f"federated DP eps={eps:g}, {sites} sites"
        console.print(f"[bold]{name}[/bold]: facefl simulate --data DATA --sites {sites} --epsilon {eps:g} "
                      f"--set mask-probability={MASK_PROBABILITY:g}" + "".join(f" --set {k}={v}" for k, v in sets.items()))
        rows[name] = user_run({**options, "target-epsilon": eps}, sets, sites, out, f"masked-eps{eps:g}-{sites}sites",
                              protocols, console, headline="masked-masked")
        atomic_write_json(out / "bench.json", report)
    console.print(masked_table(rows))
    return report


def masked_table(rows: dict) -> Table:
    table = Table(title="Masked faces (sites' faces masked with probability 1/2): View 1 accuracy / ROC AUC")
    for col in ("setting", "masked-masked", "masked-unmasked", "original", "rounds rejected", "max epsilon"):
        table.add_column(col)
    for name, row in rows.items():
        cells = [f"{row['scores'][k]['accuracy']:.3f} / {row['scores'][k]['roc_auc']:.4f}"
                 for k in ("masked-masked", "masked-unmasked", "original")]
        table.add_row(name, *cells, str(len(row.get("rejected_rounds", []))) if "rejected_rounds" in row else "-",
                      f"{row['max_epsilon']:.2f}" if row.get("max_epsilon") else "-")
    return table


def default_table(report: dict) -> Table:
    table = Table(title="What `facefl simulate --data DATA` gives (its defaults), against its starting model")
    for col in ("model", "View-1 accuracy", "ROC AUC", "TAR@FAR=1e-3", "rank-1", "untouched people: accuracy",
                "AUC", "rounds rejected", "max epsilon"):
        table.add_column(col)
    zero = report["zero_shot"]["scores"]
    rows = [("zero-shot", zero, "-", "-")]
    if "default" in report:
        d = report["default"]
        rows.append((f"default run ({d['sites']} sites, {d['rounds']} rounds)", d["scores"],
                     str(len(d["rejected_rounds"])), f"{d['max_epsilon']:.2f}"))
    for name, scores, rejected, eps in rows:
        v1, un = scores["view1"], scores.get("untouched")
        table.add_row(name, f"{v1['accuracy']:.3f} +- {v1['accuracy_std']:.3f}", f"{v1['roc_auc']:.4f}",
                      f"{v1['tar@far=1e-3']:.3f}", f"{v1['rank1']:.3f}",
                      f"{un['accuracy']:.3f}" if un else "-", f"{un['roc_auc']:.4f}" if un else "-", rejected, eps)
    return table


def never_worse_table(report: dict) -> Table:
    zero = report["zero_shot"]["scores"]["view1"]["accuracy"]
    table = Table(title=f"Never worse than zero-shot (View 1 {zero:.3f}): each trainable part at its default "
                        "learning rate and batch, DP")
    for col in ("trainable", "epsilon", "sites", "View-1 accuracy", "vs zero-shot (points)", "ROC AUC",
                "untouched accuracy", "rounds rejected", "max epsilon"):
        table.add_column(col)
    for row in report.get("never_worse", {}).values():
        v1, un = row["scores"]["view1"], row["scores"].get("untouched")
        table.add_row(row["trainable"], f"{row['epsilon']:g}", str(row["sites"]), f"{v1['accuracy']:.3f}",
                      f"{100 * (v1['accuracy'] - zero):+.1f}", f"{v1['roc_auc']:.4f}",
                      f"{un['accuracy']:.3f}" if un else "-",
                      f"{len(row['rejected_rounds'])} of {row['rounds']}", f"{row['max_epsilon']:.2f}")
    return table
