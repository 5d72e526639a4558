"""``facefl audit site``: a deployed site audits the global model it received, against its own faces, at the site.

Members are the site's training faces, non-members its held-out (validation) faces of the same people, as many per
person (the game of ``server.privacy_audit.audit_run``, on one site). The attacks are the site's own: the margin of
the right person in its private margin head, and the similarity of a face to the person's other training faces.
Everything happens where the faces are: no face, embedding or score leaves the site; the result (rates and bounds
only) is written to the site's state directory (``privacy_self_audit.json``) and its audit log.

The model audited is the global model of the latest round the site took part in (``received_model.pt``, which every
round writes to the state directory), or a model file the server distributed (``--model``: a run checkpoint).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import torch

from client.privacy import PrivacyLedger
from client.site import AUDIT_FILE, HEAD_FILE, RECEIVED_FILE
from common.atomic import atomic_write_json
from common.audit import AuditLog
from common.config import RunConfig
from common.data.faceset import FaceSet
from common.data.sources import load_site_folder
from common.models.federated import build_models

SELF_AUDIT_FILE = "privacy_self_audit.json"
LIMITS = ("A site's own membership audit of the model it received: a lower bound for these attacks at this "
          "confidence, from this site's faces only. It can show that the model leaks this site's training faces, "
          "never that it does not; the global model also carries the other sites' data, which this audit does not "
          "see. No face, embedding or score left the site.")


class SelfAuditError(ValueError):
    """The site has no model, data or state to audit."""


def _load_model(path: Path):
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        cfg = RunConfig.from_saved(saved["config"])
        models = build_models(cfg)
        models.load_state_dict(saved["state_dict"])
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise SelfAuditError(f"{path} is not a model this site can audit ({exc}); it needs a round's "
                             f"{RECEIVED_FILE} or a run checkpoint.") from exc
    if models.embedding is None:
        raise SelfAuditError(f"{path} holds no face-embedding model; the self-audit audits the face model.")
    return cfg, models, int(saved.get("round", 0))


def self_audit(state_dir: str | Path, *, data: str | Path | None = None, faces: tuple[FaceSet, FaceSet] | None = None,
               model: str | Path | None = None, confidence: float = 0.95, seed: int = 0) -> dict:
    """Audit the site whose state is ``state_dir`` on its faces (``data``: its photo folder; or ``faces``: its
    (train, validation) sets); write ``privacy_self_audit.json`` there, log it, and return it."""
    from server.privacy_audit.audit_run import embedding_scores, pool_of
    from server.privacy_audit.rates import attack_rates

    state_dir = Path(state_dir)
    source = Path(model) if model else state_dir / RECEIVED_FILE
    if not source.is_file():
        raise SelfAuditError(f"{source} does not exist: the site has not trained a round yet (or give --model).")
    cfg, models, received_round = _load_model(source)
    if faces is None:
        if data is None:
            raise SelfAuditError("Give the site's photo folder (--data).")
        faces = load_site_folder(cfg, str(data))
    train, val = faces
    ledger = PrivacyLedger.load(state_dir)
    name = ledger.site if ledger is not None else state_dir.name
    pool = pool_of(name, train, val, seed)
    if len(pool.member_index) == 0 or len(pool.non_member_labels) == 0:
        raise SelfAuditError(f"Site {name} holds no held-out faces of people it trains on (val-fraction="
                             f"{cfg.val_fraction}); there are no non-members to audit against.")
    head = None
    if (state_dir / HEAD_FILE).is_file():
        weight = torch.load(state_dir / HEAD_FILE, map_location="cpu", weights_only=True)["weight"]
        head = weight if int(train.labels.max()) < len(weight) else None
    if ledger is not None:
        epsilon, delta = ledger.spent, ledger.delta
    else:
        epsilon, delta = math.inf, cfg.target_delta or 1.0 / (10 * len(train))
    scores = embedding_scores(models.embedding, [pool], [head], seed)
    named = {"margin": scores["margin"]} if "margin" in scores else {}
    named["similarity"] = scores["centroid"]
    per_attack = 1 - (1 - confidence) / len(named)  # Bonferroni: the largest bound holds at ``confidence``
    attacks = {k: attack_rates(*v, delta=delta, confidence=per_attack, seed=seed + i).to_json()
               for i, (k, v) in enumerate(named.items())}
    for a in attacks.values():
        a.pop("roc_fpr", None), a.pop("roc_tpr", None)
    lower = max(a["epsilon_lower_bound"] for a in attacks.values())
    result = {"site": name, "audited": str(source), "round": received_round, "confidence": confidence,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "members": int(len(pool.member_index)), "non_members": int(len(pool.non_member_labels)),
              "accountant_epsilon": epsilon, "delta": delta, "epsilon_lower_bound": lower,
              "best_auc": max(a["auc"] for a in attacks.values()), "consistent": bool(lower <= epsilon),
              "attacks": attacks, "limits": LIMITS}
    atomic_write_json(state_dir / SELF_AUDIT_FILE, result)
    AuditLog(state_dir / AUDIT_FILE, actor=f"site:{name}").append(
        "privacy-self-audit", round=received_round, audited=str(source), members=result["members"],
        non_members=result["non_members"], best_auc=result["best_auc"], epsilon_lower_bound=lower,
        accountant_epsilon=epsilon, delta=delta, confidence=confidence)
    return result
