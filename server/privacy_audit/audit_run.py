"""``facefl audit privacy RUN_DIR``: membership inference against a finished simulated run's models.

The game, per site: the non-members are the site's validation faces; the members are as many training faces of each
of those people, drawn at random. ``train_val_split`` chose them at random among each person's faces
and no site ever trained on them, so members and non-members are exchangeable but for training: the
example-level game DP-SGD's epsilon speaks of. The pools of all sites are audited together against the global
model (each site's own head for the head's attack), beside the largest epsilon and delta of any site.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.site import HEAD_FILE
from common.atomic import atomic_write_json
from common.config import RunConfig
from common.data.sources import site_faces
from server.privacy_audit.rates import AttackRates, attack_rates
from server.privacy_audit.reference import (MAX_POPULATION, MIN_POPULATION, population, reference_embedding,
                                            reference_vae)
from server.privacy_audit.scores import centroid_plan, centroid_similarity, embed, head_margins, vae_losses
from server.rundir import METRICS_FILE, RunDirError, load_run_models

log = logging.getLogger("facefl.privacy_audit")

AUDIT_FILE = "privacy_audit.json"
ATTACKS = {
    "vae": {"loss": "loss threshold (Yeom et al. 2018)",
            "calibrated": "loss relative to a reference VAE (difficulty calibration, Watson et al. 2022)"},
    "embedding": {"margin": "margin score of the site's private head (Carlini et al. 2022)",
                  "calibrated": "the head's margin less what a reference model's similarity of the face to the "
                                "person's other training faces predicts (difficulty calibration, Watson et al. "
                                "2022)",
                  "similarity": "similarity to the person's other training faces (no site head was found)",
                  "calibrated-similarity": "that similarity relative to a reference model's"},
}
LIMITS = ("An audit gives a lower bound on epsilon for these attacks at this confidence: it can show that a model "
          "leaks, never that it does not. Stronger attacks (many shadow models, canaries crafted to be memorised, "
          "white-box access to every round's update) can find more. The accountant's epsilon is the proven upper "
          "bound for one training face of one site; it does not cover a person with several faces (group privacy), "
          "and it says nothing about what a face model reveals of people who were never trained on.")


@dataclass(frozen=True)
class AuditSettings:
    reference_epochs_vae: int = 4
    reference_epochs_embedding: int = 10
    confidence: float = 0.95
    seed: int = 0


def _site_privacy(run_dir: Path) -> dict[str, dict]:
    path = run_dir / METRICS_FILE
    try:
        privacy = json.loads(path.read_text()).get("privacy", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({exc}); the audit needs the run's per-site privacy record.") from exc
    return privacy


def _num_sites(privacy: dict[str, dict], sites: int | None) -> int:
    if sites:
        return sites
    indices = [int(name.split("-", 1)[1]) for name in privacy if name.startswith("site-") and name[5:].isdigit()]
    if not indices or sorted(indices) != list(range(len(indices))):
        raise RunDirError("The run's sites are not simulated partitions site-0..site-N-1 (a deployment?); the audit "
                          "needs every site's faces and runs on simulated runs. Pass --sites N if they were renamed.")
    return len(indices)


@dataclass
class SitePool:
    """One site's candidates: its training faces and validation faces of the people that have both."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    member_index: torch.Tensor  # into the training faces
    non_member_images: torch.Tensor
    non_member_labels: torch.Tensor
    num_examples: int


def site_pool(cfg: RunConfig, index: int, num_sites: int, seed: int = 0) -> SitePool:
    """Site ``index``'s candidates: for every person with validation faces, that many of their training faces
    drawn at random (members) and the validation faces (non-members). Equal numbers per person keep the two pools
    alike in everything but training: a person with 3 faces gives 1 of 3 to validation, one with 500 gives 50, so
    taking all training faces as members would weigh people differently in the two pools."""
    train, val = site_faces(cfg, index, num_sites)
    return pool_of(f"site-{index}", train, val, seed * 1_000_003 + index)


def pool_of(name: str, train, val, seed: int) -> SitePool:
    """:func:`site_pool` of a site's (train, validation) faces, with its own seed."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(val.labels).tolist():
        own = torch.nonzero(train.labels == label).flatten()
        take = min(int((val.labels == label).sum()), len(own))
        chosen.append(own[torch.randperm(len(own), generator=gen)[:take]])
    member_index = torch.sort(torch.cat(chosen)).values if chosen else torch.zeros(0, dtype=torch.long)
    return SitePool(name, train.images, train.labels, member_index, val.images, val.labels, len(train))


def embedding_scores(backbone, pools: list[SitePool], heads: list[torch.Tensor | None], seed: int) -> dict:
    """Per-attack (member, non-member) score arrays of one backbone over all sites."""
    margin_in, margin_out, cen_in, cen_out = [], [], [], []
    for k, (pool, head) in enumerate(zip(pools, heads)):
        train_emb = embed(backbone, pool.train_images)
        out_emb = embed(backbone, pool.non_member_images)
        in_emb, in_labels = train_emb[pool.member_index], pool.train_labels[pool.member_index]
        if head is not None:
            margin_in.append(head_margins(in_emb, in_labels, head))
            margin_out.append(head_margins(out_emb, pool.non_member_labels, head))
        labels = torch.cat([in_labels, pool.non_member_labels])
        is_member = torch.cat([torch.ones(len(in_labels), dtype=torch.bool),
                               torch.zeros(len(pool.non_member_labels), dtype=torch.bool)])
        index = torch.cat([pool.member_index, torch.full((len(pool.non_member_labels),), -1)])
        plan = centroid_plan(pool.train_labels, labels, is_member, index, seed + k)
        sims = centroid_similarity(torch.cat([in_emb, out_emb]), train_emb, plan)
        cen_in.append(sims[: len(in_labels)])
        cen_out.append(sims[len(in_labels):])
    out = {"centroid": (np.concatenate(cen_in), np.concatenate(cen_out))}
    if margin_in and len(margin_in) == len(pools):
        out["margin"] = (np.concatenate(margin_in), np.concatenate(margin_out))
    return out


def calibrate(target_in: np.ndarray, target_out: np.ndarray, ref_in: np.ndarray,
              ref_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target scores less the part a reference score predicts (a least-squares line over all candidates, fitted
    without their membership): what is left is what training added beyond how easy the face is."""
    slope, intercept = np.polyfit(np.r_[ref_in, ref_out], np.r_[target_in, target_out], 1)
    return target_in - (slope * ref_in + intercept), target_out - (slope * ref_out + intercept)


def _vae_scores(vae, pools: list[SitePool], cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(member, non-member) losses of one VAE over all sites."""
    losses_in = [vae_losses(vae, p.train_images[p.member_index], beta=cfg.vae_beta, recon=cfg.vae_recon) for p in pools]
    losses_out = [vae_losses(vae, p.non_member_images, beta=cfg.vae_beta, recon=cfg.vae_recon) for p in pools]
    return np.concatenate(losses_in), np.concatenate(losses_out)


def _load_heads(cfg: RunConfig, run_dir: Path, pools: list[SitePool]) -> list[torch.Tensor | None]:
    state_root = Path(cfg.state_dir) if cfg.state_dir else run_dir / "sites"
    heads = []
    for pool in pools:
        path = state_root / pool.name / HEAD_FILE
        try:
            weight = torch.load(path, map_location="cpu", weights_only=True)["weight"]
        except (OSError, KeyError, RuntimeError) as exc:
            log.warning("No margin head for %s (%s): the head's attack is skipped.", pool.name, exc)
            heads.append(None)
            continue
        heads.append(weight if int(pool.train_labels.max()) < len(weight) else None)
    return heads


def _accountant(privacy: dict[str, dict], cfg: RunConfig, pools: list[SitePool]) -> tuple[float, float]:
    """(largest epsilon spent by any site, largest delta); without DP epsilon is infinite and delta is the one a DP
    run of these sites would have used (1 / 10 N for the smallest site)."""
    if not cfg.dp:
        return math.inf, max(cfg.target_delta or 1.0 / (10 * p.num_examples) for p in pools)
    sites = [privacy.get(p.name, {}) for p in pools]
    return max(s.get("epsilon", 0.0) for s in sites), max(s.get("delta", 0.0) for s in sites)


def audit_run(run_dir: str | Path, *, sites: int | None = None, settings: AuditSettings = AuditSettings(),
              write: bool = True) -> dict:
    """Audit the latest checkpoint of the simulated run in ``run_dir``; writes ``privacy_audit.json`` there and
    returns its content."""
    run_dir = Path(run_dir)
    cfg, models, done = load_run_models(run_dir)
    privacy = _site_privacy(run_dir)
    n = _num_sites(privacy, sites)
    pools = [site_pool(cfg, k, n, settings.seed) for k in range(n)]
    members = sum(len(p.member_index) for p in pools)
    non_members = sum(len(p.non_member_labels) for p in pools)
    if members == 0 or non_members == 0:
        raise RunDirError(f"The sites of {run_dir} hold no validation faces (val-fraction={cfg.val_fraction}, or no "
                          "person with three or more faces), so there are no non-members to audit against.")
    epsilon, delta = _accountant(privacy, cfg, pools)
    ref_faces = population(cfg, max_faces=min(MAX_POPULATION, max(MIN_POPULATION, members + non_members)))
    result: dict = {
        "run": str(run_dir.resolve()), "round": done, "created": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), "confidence": settings.confidence, "sites": n,
        "game": (f"members: {members} training faces of the people who also have validation faces at their site, as "
                 f"many per person as that person's validation faces, drawn at random; non-members: those "
                 f"{non_members} validation faces (chosen at random per person, never trained on); {n} sites "
                 "pooled"),
        "reference": f"{len(ref_faces)} faces of {ref_faces.num_identities} evaluation people no site trains on",
        "limits": LIMITS, "models": {},
    }

    def rates(scores_in, scores_out, salt: int) -> AttackRates:
        # Two attacks per model, and the model's bound is the larger of theirs: each is taken at 1 - alpha / 2
        # (Bonferroni), so that the larger one holds at the stated confidence.
        return attack_rates(scores_in, scores_out, delta=delta, confidence=1 - (1 - settings.confidence) / 2,
                            seed=settings.seed + salt)

    if models.vae is not None:
        loss_in, loss_out = _vae_scores(models.vae, pools, cfg)
        ref = reference_vae(cfg, ref_faces, epochs=settings.reference_epochs_vae)
        ref_in, ref_out = _vae_scores(ref, pools, cfg)
        attacks = {"loss": rates(-loss_in, -loss_out, 1),
                   "calibrated": rates(np.log(ref_in) - np.log(loss_in), np.log(ref_out) - np.log(loss_out), 2)}
        result["models"]["vae"] = _model_entry("vae", attacks, cfg, epsilon, delta)
    if models.embedding is not None:
        target = embedding_scores(models.embedding, pools, _load_heads(cfg, run_dir, pools), settings.seed)
        ref = reference_embedding(cfg, ref_faces, epochs=settings.reference_epochs_embedding)
        reference = embedding_scores(ref, pools, [None] * len(pools), settings.seed)
        attacks = {}
        (r_in, r_out) = reference["centroid"]
        if "margin" in target:
            attacks["margin"] = rates(*target["margin"], 3)
            attacks["calibrated"] = rates(*calibrate(*target["margin"], r_in, r_out), 4)
        else:  # no site heads: the backbone's own similarity, relative to the reference's
            (t_in, t_out) = target["centroid"]
            attacks["similarity"] = rates(t_in, t_out, 3)
            attacks["calibrated-similarity"] = rates(t_in - r_in, t_out - r_out, 4)
        result["models"]["embedding"] = _model_entry("embedding", attacks, cfg, epsilon, delta)
    if write:
        from server.tracking import track_audit

        previous = load_audit(run_dir) or {}
        if previous.get("canaries", {}).get("round") == done:  # the canary audit of this checkpoint stays
            result["canaries"] = previous["canaries"]
        atomic_write_json(run_dir / AUDIT_FILE, result)
        track_audit(run_dir, result)
    return result


def merge_into_audit(run_dir: str | Path, key: str, entry: dict) -> None:
    """Put ``entry`` under ``key`` in the run's ``privacy_audit.json`` (kept with the membership audit when that is of
    the same round) and log it to the run's MLflow run."""
    from server.tracking import track_audit

    run_dir = Path(run_dir)
    current = load_audit(run_dir) or {}
    if current.get("round") != entry.get("round"):
        current = {"run": str(run_dir.resolve()), "round": entry.get("round"), "models": {}}
    current[key] = entry
    atomic_write_json(run_dir / AUDIT_FILE, current)
    track_audit(run_dir, {"round": entry.get("round"), key: entry})


def _model_entry(kind: str, attacks: dict[str, AttackRates], cfg: RunConfig, epsilon: float, delta: float) -> dict:
    best_auc = max(a.auc for a in attacks.values())
    lower = max(a.epsilon_lower for a in attacks.values())
    return {"dp": cfg.dp, "accountant_epsilon": epsilon, "delta": delta, "best_auc": best_auc,
            "epsilon_lower_bound": lower, "confidence": 1 - 2 * (1 - next(iter(attacks.values())).confidence), "consistent": bool(lower <= epsilon),
            "attacks": {name: {"description": ATTACKS[kind][name], **a.to_json()} for name, a in attacks.items()}}


def load_audit(run_dir: str | Path) -> dict | None:
    """A run's ``privacy_audit.json``, or None when it has none or it cannot be read."""
    path = Path(run_dir) / AUDIT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
