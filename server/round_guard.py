"""Never worse than where it started: the server keeps the previous global face model when a round makes it worse.

Every aggregate is scored on the pairs of the server's *validation people* (``common.data.sources.validation_data``:
training people held out from every site, and from the test protocol). A round whose aggregate scores a lower ROC
AUC than the best global model so far (less ``reject-tolerance``) is rejected: the global model stays as it was, the
sites train from it again next round, and the rejection is logged in ``metrics.json`` (the round's ``guard``
record) and shown in the report. Test pairs never choose a model.

Scoring reads only the global model and faces the server already holds: it adds nothing to any site's privacy
cost. A frozen pretrained trunk runs once per validation face (and its mirror image); each round then runs only
the part that trains.
"""

from __future__ import annotations

import logging

import torch

from client.train import split_frozen, trunk_features_and_mirror, trunk_fingerprint
from common.config import RunConfig
from common.data.sources import PairSet
from common.metrics import pair_scores, verification_metrics
from common.models.federated import build_models
from server.evaluate import _head_embed, flip_embed

log = logging.getLogger("facefl.server")


class RoundGuard:
    """Scores global models on the validation pairs and decides whether a round's aggregate is kept.

    Parameters
    ----------
    cfg : RunConfig
        The run (its models are rebuilt here, privately, for scoring).
    pairs : PairSet
        The validation people's pairs.
    """

    def __init__(self, cfg: RunConfig, pairs: PairSet) -> None:
        self.models = build_models(cfg)
        self.pairs = pairs
        self.tolerance = float(cfg.reject_tolerance)
        self.enabled = bool(cfg.reject_worse_rounds)
        self.best: float | None = None
        self._features: dict[str, torch.Tensor] = {}

    def score(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """``{"roc_auc", "accuracy"}`` of the global model ``state`` on the validation pairs (flip-averaged)."""
        self.models.load_state_dict(state)
        model = self.models.embedding
        split = split_frozen(model)
        if split is not None:
            trunk, head = split
            key = trunk_fingerprint(trunk)
            if key not in self._features:
                self._features = {key: trunk_features_and_mirror(trunk, self.pairs.images)}
            emb = _head_embed(head, self._features[key], flip=True)
        else:
            emb = flip_embed(model, self.pairs.images)
        metrics = verification_metrics(pair_scores(emb[self.pairs.a], emb[self.pairs.b]), self.pairs.same)
        return {"roc_auc": float(metrics["roc_auc"]), "accuracy": float(metrics["accuracy"])}

    def judge(self, server_round: int, previous: dict[str, torch.Tensor],
              candidate: dict[str, torch.Tensor]) -> dict:
        """Whether ``candidate`` (this round's aggregate) replaces ``previous`` (the global model the round started
        from). Returns the round's ``guard`` record: ``kept`` (False: rejected, the previous model stays), the
        candidate's validation AUC and accuracy, and the best AUC before it."""
        if self.best is None:  # the starting model (round 0, or the checkpoint a resumed run starts from)
            self.best = self.score(previous)["roc_auc"]
        scored = self.score(candidate)
        best_before = self.best
        kept = (not self.enabled) or scored["roc_auc"] >= best_before - self.tolerance
        if kept:
            self.best = max(self.best, scored["roc_auc"])
        else:
            log.warning("round %d rejected: validation ROC AUC %.5f is below the best so far %.5f less %g; "
                        "the global model stays as it was.", server_round, scored["roc_auc"], best_before,
                        self.tolerance)
        return {"kept": kept, "enabled": self.enabled, "validation_auc": scored["roc_auc"], "validation_accuracy": scored["accuracy"],
                "best_auc_before": best_before, "tolerance": self.tolerance}
