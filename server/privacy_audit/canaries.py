"""``facefl audit canaries RUN_DIR``: the one-run audit of a simulated run trained with canaries (``canary-gradients``,
``canary-inputs``; the plan is ``common.canary_plan``, the insertion ``client.canaries``).

Two settings, each with its own bound (``server.privacy_audit.one_run``), both at the stated confidence:

- **white-box**: the server reads every site's update of every round, as a federation's server does. While the run
  trains, :class:`UpdateRecorder` keeps each site's update (its weights less the global weights it was sent) at the
  coordinates of the gradient canaries. A canary's score is the sum over rounds of minus its sign times its
  coordinate's update less the mean of the other sites' updates there (their own canaries sit elsewhere, so that mean
  estimates what the real faces did to the coordinate), each round's values divided by their robust spread.
- **black-box**: only the final model: the global backbone and the site's margin head (both released by training:
  the head stays at the site, and is covered by the same DP-SGD and ledger). An input canary's score is the margin of
  the label it was trained under over the best other identity, the logit margin of Carlini et al. (2022).

Each site's canaries are covered by its own ledger, so the hypothesis tested is that every canary's inclusion is
(epsilon, delta)-DP with the largest epsilon and delta of any site (without DP, delta is the one a DP run of these
sites would use, 1 / 10 N of the smallest site).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_torch_save
from common.canary_plan import canary_coordinates, gradient_canaries, input_canaries, trainable_shapes
from common.config import RunConfig
from common.data.sources import site_faces
from common.models.federated import EMBEDDING_PREFIX, build_models
from server.privacy_audit.one_run import one_run_bound
from server.privacy_audit.scores import embed, head_margins
from server.rundir import RunDirError, load_run_models

log = logging.getLogger("facefl.privacy_audit")

UPDATES_FILE = "canaries/updates.pt"
LIMITS = ("A one-run bound is a lower bound on the epsilon of this run for these canaries, at this confidence: the "
          "run is not (epsilon, delta)-DP for any smaller epsilon. If it exceeds the accountant's epsilon, the "
          "implementation or the accounting is broken. It cannot show that a run leaks less than its epsilon, and a "
          "bound far below the accountant's says that the audit is weak as much as that the run is private: even "
          "with every guess right, m canaries certify at most the 'largest certifiable' figure. The white-box bound "
          "is about what the server sees (every site's update of every round); the black-box bound about the final "
          "models only. Canaries are worst-case examples (a gradient on one coordinate, a mislabelled synthetic "
          "face); real faces are usually less exposed.")


def _site_index(name: str) -> int | None:
    match = re.fullmatch(r"site-(\d+)", name)
    return int(match.group(1)) if match else None


class UpdateRecorder:
    """The server's white-box view of a canary run: ``__call__(round, site, weights, global_weights)`` (the strategy's
    ``update_observer``) keeps the site's update at the canary coordinates of sites ``0..k`` (``k`` the largest site
    index seen so far), written to ``RUN/canaries/updates.pt`` after every update (a resumed run continues it)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path) -> None:
        backbone = build_models(cfg.replace(task="embedding")).embedding
        self.names = list(trainable_shapes(backbone))
        self.shapes = trainable_shapes(backbone)
        self.per_site, self.seed = cfg.canary_gradients, cfg.canary_seed
        self.path = Path(run_dir) / UPDATES_FILE
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        if self.path.is_file():
            self.records = torch.load(self.path, map_location="cpu", weights_only=True)["rounds"]
        self._coordinates = torch.zeros(0, dtype=torch.long)
        self._round, self._updates = None, {}  # this round's whole updates, until the round is over

    def __call__(self, server_round: int, site: str, state: dict[str, torch.Tensor],
                 sent: dict[str, torch.Tensor]) -> None:
        index = _site_index(site)
        if index is None:
            log.warning("canary audit: site %r is not a simulated site-N; its update is not recorded.", site)
            return
        if server_round != self._round:
            self._round, self._updates = server_round, {}
        self._updates[site] = torch.cat([(state[EMBEDDING_PREFIX + n].double() - sent[EMBEDDING_PREFIX + n].double())
                                         .reshape(-1) for n in self.names]).float()
        # Every site of the round at the coordinates of every site seen so far in it (replies come in any order).
        wanted = (max(map(_site_index, self._updates)) + 1) * self.per_site
        if len(self._coordinates) < wanted:
            self._coordinates = canary_coordinates(self.shapes, wanted, self.seed)
        self.records[int(server_round)] = {name: update[self._coordinates] for name, update in self._updates.items()}
        atomic_torch_save(self.path, {"per_site": self.per_site, "rounds": self.records}, durable=False)


def white_box_scores(records: dict[int, dict[str, torch.Tensor]], signs: list[torch.Tensor]) -> np.ndarray:
    """One score per gradient canary (site by site, in plan order) from the recorded updates: higher means more
    likely included.

    For site k's canary at coordinate j, in round r: D = its update at j less the mean of the other sites' updates at j
    (their canaries sit elsewhere, so that mean estimates what the real faces did there). Its noise differs from one
    coordinate to the next (a projection's coordinate moves with its input feature's size) and from round to round
    (the learning rate), so D is divided by ``a_r * b_j``: ``a_r`` the round's median spread of the other sites'
    updates, ``b_j`` the coordinate's own spread relative to it, pooled over the rounds (and shrunk towards 1 by two
    pseudo-observations). The score is minus the canary's sign times the sum of these over rounds. With a single site
    there are no others: D is the update itself and the round's robust spread over the canaries scales it."""
    m = len(signs[0]) if signs else 0
    scores = np.zeros(len(signs) * m)
    for k, sign in enumerate(signs):
        low, high, name = k * m, (k + 1) * m, f"site-{k}"
        diffs, scales = [], []  # per round: D [m]; the others' sample variance [m] and their count
        for sites in records.values():
            own = sites.get(name)
            if own is None or len(own) < high:
                continue
            rows = [v[low:high].double() for s, v in sites.items() if s != name and len(v) >= high]
            others = torch.stack(rows) if rows else None
            if others is None or len(others) < 2:
                diff = own[low:high].double() - (others.mean(0) if others is not None else 0.0)
                spread = 1.4826 * float((diff - diff.median()).abs().median())
                diffs.append(diff / (spread if spread > 0 else float(diff.std()) or 1.0))
                scales.append(None)
                continue
            diff = own[low:high].double() - others.mean(0)
            variance = others.var(0) * (1 + 1 / len(others))  # the variance D would have without a canary
            diffs.append(diff)
            scales.append((variance, len(others) - 1))
        pooled = [(v / float(v.median().clamp_min(1e-300)), dof) for v, dof in (x for x in scales if x is not None)]
        if pooled:
            weight = sum(dof for _, dof in pooled)
            b2 = (sum(rel * dof for rel, dof in pooled) + 2.0) / (weight + 2.0)  # [m], shrunk towards 1
        for diff, scale in zip(diffs, scales):
            if scale is not None:
                diff = diff / (float(scale[0].median().clamp_min(1e-300)).__pow__(0.5) * b2.sqrt())
            scores[low:high] += (-sign.double() * diff).numpy()
    return scores


def black_box_scores(backbone: torch.nn.Module, heads: list[torch.Tensor], images: list[torch.Tensor],
                     labels: list[torch.Tensor]) -> np.ndarray:
    """One score per input canary: its margin, in its site's head, of the label it was trained under."""
    return np.concatenate([head_margins(embed(backbone, x), y, head) for x, y, head in zip(images, labels, heads)])


def _privacy(run_dir: Path, n: int, examples: list[int], cfg: RunConfig) -> tuple[float, float]:
    try:
        privacy = json.loads((run_dir / "metrics.json").read_text()).get("privacy", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{run_dir / 'metrics.json'} cannot be read ({exc}).") from exc
    if not cfg.dp:
        return math.inf, cfg.target_delta or 1.0 / (10 * min(examples))
    sites = [privacy.get(f"site-{k}", {}) for k in range(n)]
    return max(s.get("epsilon", 0.0) for s in sites), max(s.get("delta", 0.0) for s in sites)


def _num_sites(run_dir: Path, sites: int | None) -> int:
    if sites:
        return sites
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = {name for r in metrics.get("rounds", []) for name in r.get("sites", {})} | set(metrics.get("privacy", {}))
    indices = sorted(i for i in map(_site_index, names) if i is not None)
    if not indices or indices != list(range(len(indices))):
        raise RunDirError("The run's sites are not simulated partitions site-0..site-N-1; the canary audit needs the "
                          "plan's sites. Pass --sites N.")
    return len(indices)


def canary_audit(run_dir: str | Path, *, sites: int | None = None, confidence: float = 0.95,
                 write: bool = True) -> dict:
    """Audit the canaries of the simulated run in ``run_dir``; merges the result into ``privacy_audit.json`` (key
    ``canaries``) and the run's MLflow run, and returns it."""
    from client.site import HEAD_FILE

    run_dir = Path(run_dir)
    cfg, models, done = load_run_models(run_dir)
    if not (cfg.canary_gradients or cfg.canary_inputs):
        raise RunDirError(f"{run_dir} was trained without canaries; train one with --set canary-gradients=M (white-box) "
                          "and/or --set canary-inputs=M (black-box).")
    n = _num_sites(run_dir, sites)
    faces = [site_faces(cfg, k, n)[0] for k in range(n)]
    epsilon, delta = _privacy(run_dir, n, [len(f) for f in faces], cfg)
    result: dict = {"round": done, "sites": n, "confidence": confidence, "accountant_epsilon": epsilon,
                    "delta": delta, "dp": cfg.dp, "canary_norm": cfg.canary_norm,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "limits": LIMITS,
                    "settings": {}}
    if cfg.canary_gradients:
        shapes = trainable_shapes(build_models(cfg.replace(task="embedding")).embedding)
        plans = [gradient_canaries(shapes, site_index=k, per_site=cfg.canary_gradients, seed=cfg.canary_seed)
                 for k in range(n)]
        path = run_dir / UPDATES_FILE
        if not path.is_file():
            raise RunDirError(f"{path} is missing: the server did not record the sites' updates (white-box).")
        records = torch.load(path, map_location="cpu", weights_only=True)["rounds"]
        scores = white_box_scores(records, [p.sign for p in plans])
        bound = one_run_bound(scores, torch.cat([p.included for p in plans]).numpy(), delta=delta,
                              confidence=confidence)
        result["settings"]["white-box"] = {
            "what": (f"gradient canaries: {cfg.canary_gradients} per site, each {cfg.canary_norm:g} x max-grad-norm on "
                     f"one coordinate of the federated model (clipped by DP-SGD like any example); read off every "
                     f"site's update of {len(records)} rounds"), **bound.to_json()}
    if cfg.canary_inputs:
        state_root = Path(cfg.state_dir) if cfg.state_dir else run_dir / "sites"
        heads, images, labels, included = [], [], [], []
        for k in range(n):
            plan = input_canaries(site_index=k, per_site=cfg.canary_inputs, num_identities=faces[k].num_identities,
                                  image_size=cfg.image_size, seed=cfg.canary_seed)
            path = state_root / f"site-{k}" / HEAD_FILE
            try:
                heads.append(torch.load(path, map_location="cpu", weights_only=True)["weight"])
            except (OSError, KeyError, RuntimeError) as exc:
                raise RunDirError(f"site-{k}'s margin head ({path}) cannot be read ({exc}); the black-box audit scores "
                                  "input canaries with it.") from exc
            images.append(plan.images)
            labels.append(plan.labels)
            included.append(plan.included)
        scores = black_box_scores(models.embedding, heads, images, labels)
        bound = one_run_bound(scores, torch.cat(included).numpy(), delta=delta, confidence=confidence)
        result["settings"]["black-box"] = {
            "what": (f"input canaries: {cfg.canary_inputs} per site, synthetic cartoon faces each labelled as a random "
                     "person of its site; scored on the final global model with the site's margin head"),
            **bound.to_json()}
    for name, entry in result["settings"].items():
        entry["consistent"] = bool(entry["epsilon_lower_bound"] <= epsilon)
    if write:
        from server.privacy_audit.audit_run import merge_into_audit

        merge_into_audit(run_dir, "canaries", result)
    return result


def canary_lines(result: dict) -> list[str]:
    """The canary audit's lines for the console."""
    eps = result["accountant_epsilon"]
    lines = [f"canary audit (one run, Steinke et al. 2023), round {result['round']}, {result['sites']} sites, "
             f"accountant epsilon {'none (no DP)' if eps == math.inf else f'{eps:.2f}'}, delta {result['delta']:.1e}"]
    for name, s in result["settings"].items():
        lines.append(f"  {name}: epsilon >= {s['epsilon_lower_bound']:.2f} at {s['confidence']:.0%} confidence "
                     f"({s['correct']} of {s['guesses']} guesses right, m = {s['canaries']} canaries, "
                     f"{s['included']} included); the largest bound {s['canaries']} canaries can certify: "
                     f"{s['max_certifiable']:.2f}")
    return lines
