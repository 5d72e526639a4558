"""The server's side of a run: build the strategy, evaluate globally every round, checkpoint, resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from common.audit import AuditError, AuditLog, app_hash
from common.config import RunConfig
from common.data.sources import eval_data, validation_data
from common.models.federated import build_models
from common.weights import default_cache_dir
from server.evaluate import evaluate_global
from server.face_judge import load_face_judge
from server.round_guard import RoundGuard
from server.rundir import DiskFullError, RunDirectory, default_run_dir, is_disk_full
from server.secure_rounds import run_secure_rounds
from server.strategy import build_strategy
from server.tracking import start_tracking

log = logging.getLogger("facefl.server")


def summarize(server_round: int, num_rounds: int, metrics: dict, privacy: dict, seconds: float,
              guard: dict | None = None) -> str:
    """One human-readable progress line for a round."""
    parts = [f"round {server_round}/{num_rounds}"]
    if guard and not guard.get("kept", True):
        parts.append(f"REJECTED (validation AUC {guard['validation_auc']:.5f} < best {guard['best_auc_before']:.5f} "
                     f"- {guard['tolerance']:g}): previous model kept")
    if "embedding/accuracy" in metrics:
        parts.append(f"verif acc {metrics['embedding/accuracy']:.3f} auc {metrics['embedding/roc_auc']:.3f}")
    if "vae/psnr" in metrics:
        parts.append(f"vae psnr {metrics['vae/psnr']:.2f} ssim {metrics['vae/ssim']:.3f}")
    if "vae/identity-kept" in metrics:
        parts.append(f"identity kept {metrics['vae/identity-kept']:.2f}")
    eps = [p.get("epsilon", 0.0) for p in privacy.values()]
    if eps and max(eps) > 0:
        parts.append(f"eps max {max(eps):.2f}")
    parts.append(f"{seconds:.0f}s")
    return " | ".join(parts)


AUDIT_FILE = "audit.jsonl"


def audit_round(audit: AuditLog, server_round: int, report, metrics: dict, privacy: dict, seen: set[str]) -> None:
    """The server's audit entries for one round: sites that joined or left, rejected updates, exhausted budgets,
    and the round's results with every site's audit head (so a truncated site log is detectable)."""
    if report is None:
        return
    replied = set(report.sites) | set(report.failed)
    for site in sorted(replied - seen):
        audit.append("site-joined", round=server_round, site=site)
    for site in sorted(seen - replied):
        audit.append("site-left", round=server_round, site=site)
    seen.clear()
    seen.update(replied)
    for site, reason in sorted(report.rejected.items()):
        audit.append("update-rejected", round=server_round, site=site, reason=reason)
    for site, reason in sorted(report.refused.items()):
        audit.append("app-refused", round=server_round, site=site, reason=reason)
    for site, message in sorted(report.declined.items()):
        audit.append("budget-exhausted", round=server_round, site=site, message=message,
                     epsilon=privacy.get(site, {}).get("epsilon"))
    used = sorted(set(report.sites) - set(report.declined) - set(report.rejected))
    audit.append("round-results", round=server_round, aggregated=used, declined=sorted(report.declined),
                 rejected=sorted(report.rejected), failed=sorted(report.failed), metrics=metrics,
                 epsilon={s: privacy.get(s, {}).get("epsilon") for s in sorted(report.sites)},
                 site_audit_heads=dict(sorted(report.audit_heads.items())))


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
    audit = AuditLog(run.path / AUDIT_FILE, actor="server")
    audit.append("run-started", app_hash=app_hash(), resumed_after_round=start_round, config=cfg.to_mapping(),
                 dp={"enabled": cfg.dp, "target_epsilon": cfg.target_epsilon, "target_delta": cfg.target_delta,
                     "max_grad_norm": cfg.max_grad_norm, "accountant": cfg.accountant,
                     "planned_rounds": cfg.planned_rounds or cfg.num_rounds},
                 aggregation={"strategy": cfg.strategy, "aggregator": cfg.aggregator,
                              "max_update_norm": cfg.max_update_norm, "min_sites": cfg.min_sites,
                              "secure_aggregation": cfg.secure_aggregation})
    seen: set[str] = set()
    try:
        tracker = start_tracking(cfg, run.path)
    except Exception as exc:  # an unreachable tracking server: the run ends before its first round, and says why
        _record_failure(run, audit, None, f"{type(exc).__name__}: {exc}")
        raise
    state = checkpoint["state_dict"] if checkpoint else reference
    if checkpoint:
        models.load_state_dict(state)
    remaining = cfg.num_rounds - start_round
    log.info("facefl run directory: %s (starting after round %d, %d rounds to go)", run.path.resolve(), start_round,
             remaining)
    if remaining <= 0:
        run.finish()
        if tracker is not None:
            tracker.finish()
        return run.path

    data = eval_data(cfg)
    run.metrics["run"]["evaluation"] = data.description
    judge = load_face_judge(cfg.cache_dir or default_cache_dir()) if cfg.trains_vae else None
    strategy = build_strategy(cfg, reference, round_offset=start_round)
    if cfg.validates_rounds:
        pairs = validation_data(cfg)
        if pairs is not None:
            strategy.guard = RoundGuard(cfg, pairs)
            run.metrics["run"]["validation"] = pairs.description
    if cfg.canary_gradients:  # a canary audit: the server keeps every site's update at the canaries' coordinates
        from server.privacy_audit.canaries import UpdateRecorder

        strategy.update_observer = UpdateRecorder(cfg, run.path)
    if checkpoint and checkpoint.get("server_state"):
        strategy.load_server_state(checkpoint["server_state"])
    state_root = Path(cfg.state_dir) if cfg.state_dir else run.path / "sites"
    timer = {"t": time.perf_counter()}
    writing = {"round": start_round + 1}  # the round whose results are being produced (for a disk-full message)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        absolute = server_round + start_round
        if server_round == 0 and start_round > 0:
            return None  # this state was evaluated before the interruption
        writing["round"] = absolute
        current = arrays.to_torch_state_dict()
        models.load_state_dict(current)
        metrics = evaluate_global(models, data, judge)
        report = strategy.reports.get(absolute)
        seconds = time.perf_counter() - timer["t"]
        run.record_round(absolute, metrics, seconds, strategy.train_metrics.get(absolute), report)
        if absolute > 0:
            run.save_checkpoint(absolute, current, strategy.server_state())
        audit_round(audit, absolute, report, metrics, run.metrics["privacy"], seen)
        if tracker is not None:
            tracker.log_round(absolute, metrics, run.metrics["privacy"], seconds)
        log.info("facefl %s", summarize(absolute, cfg.num_rounds, metrics, run.metrics["privacy"], seconds,
                                        report.guard if report is not None else None))
        timer["t"] = time.perf_counter()
        writing["round"] = absolute + 1
        return MetricRecord(metrics)

    train_config = ConfigRecord({"state-root": str(state_root.resolve())})
    try:
        if cfg.secure_aggregation:
            run_secure_rounds(grid, strategy, ArrayRecord(state), remaining, train_config, evaluate_fn, cfg)
        else:
            strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=remaining,
                           timeout=cfg.round_timeout, train_config=train_config, evaluate_fn=evaluate_fn)
    except BaseException as exc:
        if not is_disk_full(exc):
            _record_failure(run, audit, tracker, f"{type(exc).__name__}: {exc}")
            raise
        # A full disk: every write that follows may fail as well. Each record of the failure is tried on its
        # own; what was written before stays as it was (every file is replaced atomically, audit lines whole).
        message = run.disk_full_message(writing["round"], resume_hint(run.path))
        log.error("facefl %s", message)
        rounds = run.checkpoint_rounds()
        run.metrics["run"]["completed_rounds"] = rounds[-1] if rounds else 0
        _record_failure(run, audit, tracker, message)
        raise DiskFullError(message) from exc
    run.finish()
    if tracker is not None:
        tracker.finish()
    audit.append("run-finished", status="completed", completed_rounds=run.metrics["run"].get("completed_rounds", 0))
    return run.path


def resume_hint(run_dir: Path) -> str:
    """How a stopped run continues, in a simulation and in a deployment."""
    return (f"`facefl simulate --resume {run_dir}`, or in a deployment `flwr run` with "
            f"--run-config \"resume-from='{run_dir}'\".")


def _record_failure(run: RunDirectory, audit: AuditLog, tracker, error: str) -> None:
    """Mark the run failed in metrics.json, the audit log and MLflow; a step that cannot be written (a full disk)
    is logged and skipped, so the run's own error is the one raised."""
    steps = [("metrics.json", lambda: run.finish("failed", error=error)),
             ("the audit log", lambda: audit.append("run-finished", status="failed", error=error,
                                                    completed_rounds=run.metrics["run"].get("completed_rounds", 0)))]
    if tracker is not None:
        steps.append(("MLflow", lambda: tracker.finish("failed")))
    for what, step in steps:
        try:
            step()
        except (OSError, AuditError) as exc:
            log.warning("facefl could not record the failure in %s: %s", what, exc)
