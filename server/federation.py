"""The server's side of a run: build the strategy, evaluate globally every round, checkpoint, resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from common.config import RunConfig
from common.models import build_models
from common.sources import eval_data
from server.evaluate import evaluate_global
from server.rundir import RunDirectory, default_run_dir
from server.strategy import build_strategy

log = logging.getLogger("facefl.server")


def summarize(server_round: int, num_rounds: int, metrics: dict, privacy: dict, seconds: float) -> str:
    """One human-readable progress line for a round."""
    parts = [f"round {server_round}/{num_rounds}"]
    if "embedding/accuracy" in metrics:
        parts.append(f"verif acc {metrics['embedding/accuracy']:.3f} auc {metrics['embedding/roc_auc']:.3f}")
    if "vae/psnr" in metrics:
        parts.append(f"vae psnr {metrics['vae/psnr']:.2f} ssim {metrics['vae/ssim']:.3f}")
    eps = [p.get("epsilon", 0.0) for p in privacy.values()]
    if eps and max(eps) > 0:
        parts.append(f"eps max {max(eps):.2f}")
    parts.append(f"{seconds:.0f}s")
    return " | ".join(parts)


def run_federation(grid, cfg: RunConfig) -> Path:
    """Run (or resume) the federation described by ``cfg`` on ``grid``; returns the run directory."""
    models = build_models(cfg)
    reference = models.state_dict()
    checkpoint = None
    if cfg.resume_from:
        run, checkpoint = RunDirectory.resume(cfg.resume_from, cfg)
    else:
        run = RunDirectory.create(cfg.run_dir or default_run_dir(), cfg)
    start_round = checkpoint["round"] if checkpoint else 0
    state = checkpoint["state_dict"] if checkpoint else reference
    if checkpoint:
        models.load_state_dict(state)
    remaining = cfg.num_rounds - start_round
    log.info("facefl run directory: %s (starting after round %d, %d rounds to go)", run.path.resolve(), start_round,
             remaining)
    if remaining <= 0:
        run.finish()
        return run.path

    data = eval_data(cfg)
    run.metrics["run"]["evaluation"] = data.description
    strategy = build_strategy(cfg, reference, round_offset=start_round)
    if checkpoint and checkpoint.get("server_state"):
        strategy.load_server_state(checkpoint["server_state"])
    state_root = Path(cfg.state_dir) if cfg.state_dir else run.path / "sites"
    timer = {"t": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        absolute = server_round + start_round
        if server_round == 0 and start_round > 0:
            return None  # this state was evaluated before the interruption
        current = arrays.to_torch_state_dict()
        models.load_state_dict(current)
        metrics = evaluate_global(models, data)
        report = strategy.reports.get(absolute)
        seconds = time.perf_counter() - timer["t"]
        run.record_round(absolute, metrics, seconds, strategy.train_metrics.get(absolute), report)
        if absolute > 0:
            run.save_checkpoint(absolute, current, strategy.server_state())
        log.info("facefl %s", summarize(absolute, cfg.num_rounds, metrics, run.metrics["privacy"], seconds))
        timer["t"] = time.perf_counter()
        return MetricRecord(metrics)

    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({"state-root": str(state_root.resolve())}),
            evaluate_fn=evaluate_fn,
        )
    except BaseException as exc:
        run.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.finish()
    return run.path
