"""A site's side of secure aggregation (Flower's SecAgg+): what it trains on and what it answers.

With ``secure-aggregation = true`` the server drives Flower's ``SecAggPlusWorkflow``; every message of its four
stages carries a ``secaggplus_configs`` record, and ``client.secagg_mod.secure_aggregation_mod`` hands those
messages to Flower's ``secaggplus_mod``. In the stage that trains, the mod calls the site's train handler with the legacy ``fitins``
records; :func:`secure_train_reply` trains as usual and answers with the site's *update* (its weights minus the
global weights) in a ``fitres`` record. The mod then quantises that update, adds the private and pairwise masks and
removes the plain arrays: what leaves the site is a masked integer vector, and the server can only unmask the sum.

What the server still sees in the clear: each site's scalar metrics (example count used as its weight, losses,
epsilon, whether it declined) and the audit head. The update itself is covered by the site's DP-SGD guarantee;
secure aggregation adds that the server never holds one site's update at all.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from common.anonymization.egress import array_signature, check_reply
from common.config import RunConfig
from common.models.federated import build_models, check_state
from common.secagg import KEYS_CONFIG, WEIGHT_METRIC

log = logging.getLogger("facefl.client")

def received_global(msg: Message, cfg: RunConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The global weights and the round config from a SecAgg+ training message (legacy ``fitins`` records),
    checked against this site's own model (names, shapes, dtypes)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.get(KEYS_CONFIG) or "").split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"The secure-aggregation round names {len(keys)} arrays but carries {len(arrays)}.")
    state = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays, strict=True)}
    check_state(build_models(cfg).state_dict(), state)
    return state, config


def secure_train_reply(msg: Message, global_state: dict[str, torch.Tensor], new_state: dict[str, torch.Tensor] | None,
                       metrics: dict[str, float], site_info: dict[str, str], cfg: RunConfig) -> Message:
    """The ``fitres`` reply that ``secaggplus_mod`` masks: the update ``new - global`` (zero when the site
    declined), weighted by the site's example count capped at ``secagg-max-examples`` (zero when it declined).

    Coordinates beyond ``secagg-clip-range`` are clipped by the quantiser; their share is reported as
    ``secagg-clipped`` so a too-small range shows up in the run's metrics."""
    keys = list(global_state)
    if new_state is None:
        delta = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
    else:
        delta = {k: (new_state[k].detach().to(v.dtype) - v) for k, v in global_state.items()}
        weight = int(min(metrics.get("num-examples", 0.0), cfg.secagg_max_examples))
    # The update passes the same egress check as a plain reply: exactly the arrays the server sent, nothing else.
    check_reply(RecordDict({"arrays": ArrayRecord(delta)}), sent_arrays=array_signature(ArrayRecord(global_state)))
    total = sum(v.numel() for v in delta.values()) or 1
    clipped = sum(int((v.abs() > cfg.secagg_clip_range).sum()) for v in delta.values())
    if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
        raise ValueError("This site's update is not finite; it is not sent.")
    out_metrics: dict = {k: float(v) for k, v in metrics.items()}
    out_metrics.update({"secagg-clipped": clipped / total, WEIGHT_METRIC: float(weight), **site_info})
    if clipped:
        log.warning("secure aggregation: %.3g%% of this site's update is beyond secagg-clip-range %g and is clipped",
                    100 * clipped / total, cfg.secagg_clip_range)
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    # float64: Flower's quantiser computes in the arrays' dtype, and float32 would cost 30x precision
                    parameters=ndarrays_to_parameters([delta[k].double().numpy() for k in keys]),
                    num_examples=weight, metrics=out_metrics)
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
