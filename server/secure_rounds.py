"""Rounds under secure aggregation: Flower's ``SecAggPlusWorkflow``, driven from facefl's own round loop.

In Flower 1.42 SecAgg+ exists only for the legacy ``LegacyContext`` / ``Strategy`` interface. This module runs the
workflow's four stages (setup, share keys, collect masked vectors, unmask) for one round at a time, with a small
adapter in place of a legacy strategy: it hands the workflow the sites to sample and their training instructions,
and receives the unmasked weighted mean of the sites' updates together with each site's scalar metrics (sent in the
clear: example count, losses, epsilon, declined). Everything else a round does (quorum, checkpoints, evaluation,
audit log, metrics.json) is the same as without secure aggregation.

What the server cannot do under SecAgg+: look at one site's update. So NaN/shape checks, ``max-update-norm`` and the
robust aggregators do not apply (the config refuses the combination); a hostile site can move the mean by at most
``secagg-clip-range`` times its share of the weight per coordinate, and a non-finite or malformed aggregate is
dropped. Bounded waits: the key-exchange and unmasking stages wait at most ``secagg-timeout`` seconds, the training
stage ``round-timeout``; a site that drops out after the key exchange is unmasked from its neighbours' shares
(SecAgg+ tolerates dropouts as long as ``secagg-threshold`` of the sites remain), and too many dropouts end the
round without an update, never in a hang.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from common.config import RunConfig
from common.secagg import KEYS_CONFIG, MODULUS, WEIGHT_METRIC, quantization_range, use_strong_masks
from server.strategy import RoundReport, SiteAwareMixin, aggregate_site_metrics, wait_for_quorum

log = logging.getLogger("facefl.server")

use_strong_masks()  # ChaCha20 mask expansion instead of Flower's 32-bit-seeded RandomState (common.secagg)


class BoundedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's workflow with two timeouts (``timeout`` for the key-exchange and unmasking stages, ``train_timeout``
    for the stage in which the sites train) and a fix for sites that drop out before the key exchange."""

    def __init__(self, *args, train_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_timeout, self.train_timeout = self.timeout, train_timeout

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        # Flower keeps a site that dropped out before its key shares were forwarded among the sampled sites, and
        # then asks the others, when unmasking, for shares of its key that they never received: the whole round
        # fails. Such a site holds no mask with anyone (masks are only added for sites whose shares arrived), so
        # it leaves the protocol here.
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        self.timeout = self.train_timeout
        try:
            return super().collect_masked_vectors_stage(grid, context, state)
        finally:
            self.timeout = self.key_timeout


class _LegacyAdapter:
    """The two calls ``SecAggPlusWorkflow`` makes on a legacy strategy: which sites train with what, and the
    aggregate. It keeps the results instead of aggregating (the workflow has already computed the mean)."""

    def __init__(self, proxies: list[GridClientProxy], fitins: FitIns) -> None:
        self.proxies, self.fitins = proxies, fitins
        self.results: list[tuple[GridClientProxy, FitRes]] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)  # sites missing from it are recorded as failed by record_secure_round
        return None, {}


class _NoClientManager:
    """``SecAggPlusWorkflow`` only asks how many sites are available (for a log line)."""

    def __init__(self, available: int) -> None:
        self.available = available

    def num_available(self) -> int:
        return self.available


@dataclass
class SecureRound:
    """What one securely aggregated round gave the server."""

    mean_update: list[np.ndarray] | None  # the weighted mean of the sites' updates, in key order; None: no aggregate
    replies: dict[int, dict] = field(default_factory=dict)  # node id -> the site's clear metrics (and name, head)
    sampled: list[int] = field(default_factory=list)
    error: str = ""


def sample_sites(node_ids: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """``fraction`` of the connected sites, at least ``minimum`` (as Flower's FedAvg samples)."""
    count = min(len(node_ids), max(int(len(node_ids) * fraction), minimum))
    return sorted(rng.sample(sorted(node_ids), count))


def secure_round(grid, node_ids: list[int], keys: list[str], global_arrays: list[np.ndarray], config: dict,
                 cfg: RunConfig) -> SecureRound:
    """Run SecAgg+ once over ``node_ids``: each site trains on ``global_arrays`` and the server learns only the
    weighted mean of their updates (``None`` when the protocol halted or no site had a non-zero weight)."""
    fitins = FitIns(ndarrays_to_parameters(global_arrays), {**config, KEYS_CONFIG: "\n".join(keys)})
    run_id = grid.run.run_id
    adapter = _LegacyAdapter([GridClientProxy(n, grid, run_id) for n in node_ids], fitins)
    state = RecordDict({MAIN_PARAMS_RECORD: ArrayRecord(), MAIN_CONFIGS_RECORD: ConfigRecord(
        {Key.CURRENT_ROUND: int(config["round"])})})
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=adapter, client_manager=_NoClientManager(len(node_ids)))  # type: ignore[arg-type]
    workflow = BoundedSecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=float(cfg.secagg_threshold), max_weight=float(cfg.secagg_max_examples),
        clipping_range=float(cfg.secagg_clip_range), quantization_range=quantization_range(len(node_ids)),
        modulus_range=MODULUS, timeout=cfg.secagg_timeout, train_timeout=cfg.round_timeout)
    out = SecureRound(None, sampled=list(node_ids))
    try:
        workflow(grid, context)
    except Exception as exc:  # a malformed reply must not take the server down: the round gets no update
        out.error = f"secure aggregation failed: {type(exc).__name__}: {exc}"
        log.warning("round %s: %s", config["round"], out.error)
        return out
    if adapter.results is None:
        out.error = "secure aggregation halted: too few sites completed the protocol (secagg-threshold)"
        log.warning("round %s: %s", config["round"], out.error)
        return out
    total = 0.0
    for proxy, fitres in adapter.results:
        out.replies[proxy.node_id] = dict(fitres.metrics)
        total += float(fitres.num_examples)
    if adapter.results and total > 0:
        out.mean_update = parameters_to_ndarrays(adapter.results[0][1].parameters)
    return out


def record_secure_round(strategy: SiteAwareMixin, absolute: int, result: SecureRound,
                        global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Fill the strategy's round report and site metrics from a secure round; the new global weights, or None."""
    report = RoundReport()
    records = []
    for node_id in result.sampled:
        metrics = result.replies.get(node_id)
        if metrics is None:
            report.failed[f"node-{node_id}"] = result.error or "no reply within the secure-aggregation protocol"
            continue
        name = str(metrics.get("site-name") or f"node-{node_id}")
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        declined = report.add_reply(name, values, str(metrics.get("audit-head") or ""), str(metrics.get("message", "")))
        if not declined and values.get(WEIGHT_METRIC, 0.0) > 0:
            records.append(RecordDict({"metrics": MetricRecord(values)}))
    strategy.reports[absolute] = report
    if records:
        aggregated = aggregate_site_metrics(records, "num-examples")
        strategy.train_metrics[absolute] = {k: float(v) for k, v in aggregated.items() if not isinstance(v, list)}
    if report.declined:
        log.info("round %d: declined (privacy budget): %s", absolute, ", ".join(sorted(report.declined)))
    if result.mean_update is None or not records:
        log.warning("round %d: no securely aggregated update; the global model is unchanged.", absolute)
        return None
    keys = list(global_state)
    if len(result.mean_update) != len(keys):
        log.warning("round %d: the secure aggregate has %d arrays, expected %d; dropped.", absolute,
                    len(result.mean_update), len(keys))
        return None
    new_state = {}
    for key, delta in zip(keys, result.mean_update, strict=True):
        ref = global_state[key]
        if tuple(delta.shape) != tuple(ref.shape) or not np.isfinite(delta).all():
            log.warning("round %d: the secure aggregate for %s is malformed or not finite; dropped.", absolute, key)
            return None
        new_state[key] = (ref.double() + torch.from_numpy(np.asarray(delta, dtype=np.float64))).to(ref.dtype)
    return strategy.guarded(absolute, report, global_state, new_state)


def run_secure_rounds(grid, strategy: SiteAwareMixin, initial_arrays: ArrayRecord, num_rounds: int,
                      train_config: ConfigRecord, evaluate_fn, cfg: RunConfig) -> None:
    """facefl's round loop with SecAgg+ (the counterpart of ``strategy.start`` for plain rounds): evaluate the
    starting weights, then per round wait for ``min-sites``, sample, aggregate securely, evaluate."""
    current = initial_arrays.to_torch_state_dict()
    keys = list(current)
    rng = random.Random(cfg.seed)
    evaluate_fn(0, initial_arrays)
    for server_round in range(1, num_rounds + 1):
        absolute = server_round + strategy.round_offset
        flwr_log(logging.INFO, "")  # as Flower's own round loop prints it (its logger reaches `flwr log`)
        flwr_log(logging.INFO, "[ROUND %d/%d] (secure aggregation, SecAgg+)", server_round, num_rounds)
        nodes = wait_for_quorum(grid, cfg.min_sites, cfg.quorum_timeout)
        sampled = sample_sites(list(nodes), cfg.fraction_train, cfg.min_sites, rng)
        result = secure_round(grid, sampled, keys, [current[k].numpy() for k in keys],
                              {**dict(train_config), "round": absolute}, cfg)
        new_state = record_secure_round(strategy, absolute, result, current)
        if new_state is not None:
            current = new_state
        evaluate_fn(server_round, ArrayRecord(current))
