"""Flower's strategies (FedAvg, FedProx, FedAdam), with what facefl adds around aggregation.

:class:`SiteAwareMixin` is placed in front of a Flower strategy class. It does not copy Flower's ``start`` loop;
it only wraps ``configure_train`` and ``aggregate_train`` so that:
- rounds are numbered from the run's start even after a resume (``round_offset``);
- replies from sites that declined (privacy budget spent), failed, or sent an update that is malformed (wrong
  entries, shapes or dtypes, NaN/Inf) or too large (L2 distance to the global model above ``max-update-norm``)
  are left out of the aggregate and recorded, and the round completes with the others;
- every site's own metrics (loss, cumulative epsilon, ...) are kept for ``metrics.json``;
- with a :class:`server.round_guard.RoundGuard` (``guard``), an aggregate that scores worse on the server's
  validation people than the best global model so far is rejected and the previous global model kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common.config import RunConfig
from common.deployment import refusing_site
from common.models.federated import check_state, update_norm

log = logging.getLogger("facefl.server")


class QuorumError(RuntimeError):
    """Fewer than ``min-sites`` sites stayed connected for longer than ``quorum-timeout``."""


class AppRefusedError(QuorumError):
    """So many sites refused the run's app (not approved there) that fewer than ``min-sites`` can take part."""


def wait_for_quorum(grid, min_sites: int, timeout: float, *, poll: float = 1.0) -> list[int]:
    """The connected node ids once at least ``min_sites`` are connected; :class:`QuorumError` after ``timeout``
    seconds without a quorum (Flower itself would wait forever)."""
    deadline = time.monotonic() + timeout
    last_logged = -1
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() >= deadline:
            raise QuorumError(f"Only {len(nodes)} of the required {min_sites} sites (min-sites) were connected for "
                              f"{timeout:g} s (quorum-timeout); the run ends here. Start more sites, or lower "
                              "min-sites, and resume the run.")
        if len(nodes) != last_logged:
            log.info("waiting for sites: %d connected, %d required (up to %g s)", len(nodes), min_sites, timeout)
            last_logged = len(nodes)
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


@dataclass
class RoundReport:
    """What the server learned about the sites in one round."""

    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # sites that refused to run the app (also in failed)
    rejected: dict[str, str] = field(default_factory=dict)
    audit_heads: dict[str, str] = field(default_factory=dict)  # each site's newest audit-log hash
    guard: dict = field(default_factory=dict)  # the aggregate's validation score; kept False: the round was rejected

    def add_reply(self, name: str, metrics: dict[str, float], audit_head: str = "", message: str = "") -> bool:
        """Record a site's reply (its metrics and audit head); True when the site declined the round."""
        self.sites[name] = metrics
        if audit_head:
            self.audit_heads[name] = audit_head
        if metrics.get("declined", 0.0) > 0:
            self.declined[name] = message
            return True
        return False


def aggregate_site_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Example-weighted mean of the sites' training metrics; epsilon is the maximum over sites, not a mean."""
    weights = [float(next(iter(r.metric_records.values()))[weighting_key]) for r in records]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for record, w in zip(records, weights, strict=True):
        for key, value in next(iter(record.metric_records.values())).items():
            if key == weighting_key or isinstance(value, list):
                continue
            if key in ("epsilon", "target-epsilon", "delta", "noise-multiplier", "sample-rate"):
                out[key] = max(out.get(key, 0.0), float(value))
            elif math.isfinite(float(value)):
                out[key] = out.get(key, 0.0) + float(value) * w / total
    out["num-sites"] = float(len(records))
    out[weighting_key] = float(sum(weights))
    return MetricRecord(out)


class SiteAwareMixin:
    """Mixin for a Flower message-based strategy; see the module docstring."""

    round_offset: int = 0

    def init_facefl(self, reference: dict, round_offset: int = 0, max_update_norm: float = 0.0,
                    min_sites: int = 1, quorum_timeout: float = 600.0, round_timeout: float = 3600.0) -> None:
        self.round_offset = round_offset
        self.min_sites, self.quorum_timeout = int(min_sites), float(quorum_timeout)
        self.round_timeout = float(round_timeout)
        self._node_names: dict[int, str] = {}  # node id -> site name, from the sites' replies
        self._sent_at = time.monotonic()
        self._reference = reference  # expected entries, shapes and dtypes of an update
        self._global = reference  # the weights sent this round (update norms are measured against them)
        self.max_update_norm = float(max_update_norm)
        self.reports: dict[int, RoundReport] = {}
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.guard = None  # a server.round_guard.RoundGuard, set by the server when validation people exist
        # Called with (round, site name, site's weights, global weights sent) for every accepted update: the canary
        # audit's white-box view (server.privacy_audit.canaries.UpdateRecorder); None otherwise.
        self.update_observer = None

    def guarded(self, absolute: int, report: RoundReport, previous: dict[str, torch.Tensor],
                candidate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's new global model: ``candidate``, or ``previous`` when the guard rejects the round."""
        if self.guard is None:
            return candidate
        report.guard = self.guard.judge(absolute, previous, candidate)
        return candidate if report.guard["kept"] else previous

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        config["round"] = absolute
        wait_for_quorum(grid, self.min_sites, self.quorum_timeout)
        self._global = arrays.to_torch_state_dict()
        # Kept: the grid gives these very messages their ids when it sends them, which names the site behind an error
        # reply the SuperLink writes itself (see failed_node).
        self._sent = list(super().configure_train(absolute, arrays, config, grid))  # type: ignore[misc]
        self._sent_at = time.monotonic()
        return self._sent

    def _note_missing(self, absolute: int, replies: list[Message], report: RoundReport) -> None:
        """Say how long the round waited, and which sites it left out because their reply did not come within
        ``round-timeout``: Flower returns the replies in hand when the timeout passes and drops later ones, so a
        site on a slow link either makes it in time (the round waits for it) or is left out of that round."""
        waited = time.monotonic() - self._sent_at
        asked = {m.metadata.dst_node_id for m in getattr(self, "_sent", [])}
        answered = {self.failed_node(m) if m.has_error() else m.metadata.src_node_id for m in replies}
        missing = sorted(asked - answered)
        for node in missing:
            name = self._node_names.get(node)  # known once the site has replied in an earlier round of this run
            report.failed[name or f"node-{node}"] = (f"no reply within round-timeout ({self.round_timeout:g} s): "
                                                     "left out of this round")
            log.warning("round %d: %s sent no reply within round-timeout (%g s): left out of this round; a reply "
                        "that arrives later is dropped", absolute, f"site {name} (node {node})" if name else
                        f"node {node}", self.round_timeout)
        log.info("round %d: %d of %d sites replied; the round waited %.0f s (round-timeout %g s)", absolute,
                 len(answered & asked), len(asked), waited, self.round_timeout)

    def failed_node(self, msg: Message) -> int:
        """The node an error reply is about. A site's own error names it as the sender; an error the SuperLink writes
        for a site that stopped heartbeating ("Node Unavailable") comes from the SuperLink (node 1) and names the
        site only through the message it replies to."""
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID:
            return msg.metadata.src_node_id
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in getattr(self, "_sent", [])}
        return sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        absolute = server_round + self.round_offset
        report = RoundReport()
        usable: list = []
        replies = list(replies)
        for msg in replies:
            node = f"node-{self.failed_node(msg) if msg.has_error() else msg.metadata.src_node_id}"
            if msg.has_error():
                reason = str(msg.error.reason)
                site = refusing_site(reason)
                report.failed[site or node] = reason
                if site:
                    report.refused[site] = reason
                    log.warning("round %d: %s (node %d)", absolute, reason, msg.metadata.src_node_id)
                else:
                    log.warning("round %d: %s left out of the round: %s", absolute, node, reason)
                continue
            content = msg.content
            name = str(content["site"]["name"]) if "site" in content.config_records else node
            self._node_names[msg.metadata.src_node_id] = name
            metrics = next(iter(content.metric_records.values()), None)
            if metrics is None:
                report.rejected[name] = "reply has no metrics"
                continue
            site = content["site"] if "site" in content.config_records else {}
            if report.add_reply(name, {k: float(v) for k, v in metrics.items() if not isinstance(v, list)},
                                str(site.get("audit-head", "")), str(site.get("message", ""))):
                continue
            try:
                arrays = next(iter(content.array_records.values()))
                state = arrays.to_torch_state_dict()
                check_state(self._reference, state)
                if self.max_update_norm > 0:
                    norm = update_norm(state, self._global)
                    if norm > self.max_update_norm:
                        raise ValueError(f"update norm {norm:.4g} is above max-update-norm {self.max_update_norm:g}")
            except (ValueError, StopIteration, TypeError) as exc:
                report.rejected[name] = str(exc)
                log.warning("round %d: update from %s rejected: %s", absolute, name, exc)
                continue
            if self.update_observer is not None:
                self.update_observer(absolute, name, state, self._global)
            usable.append((name, msg))
        # In the order of the sites' names, not of arrival: floating-point sums depend on the order, and replies
        # arrive in whatever order the sites finish, so only this makes a run with a fixed seed repeat bit for bit.
        usable = [msg for _, msg in sorted(usable, key=lambda pair: pair[0])]
        self._note_missing(absolute, replies, report)
        self.reports[absolute] = report
        willing = len(replies) - len(report.refused)
        if report.refused and willing < self.min_sites:
            raise AppRefusedError(
                f"Round {absolute}: {len(report.refused)} of {len(replies)} sites refused this app "
                f"({', '.join(sorted(report.refused))}: not approved there), so fewer than min-sites={self.min_sites} "
                "can take part; the run ends here. Have the sites' operators approve the app (facefl site approve), "
                "or lower min-sites.")
        if report.declined:
            log.info("round %d: declined (privacy budget): %s", absolute, ", ".join(sorted(report.declined)))
        if not usable:
            log.warning("round %d: no usable update; the global model is unchanged.", absolute)
            return None, None
        arrays, metrics = super().aggregate_train(absolute, usable)  # type: ignore[misc]
        if arrays is not None and self.guard is not None:
            candidate = arrays.to_torch_state_dict()
            chosen = self.guarded(absolute, report, self._global, candidate)
            if chosen is not candidate:
                arrays = ArrayRecord(chosen)
        if metrics is not None:
            self.train_metrics[absolute] = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return arrays, metrics

    # Server-side optimiser state (FedAdam's moments) for checkpoints.
    def server_state(self) -> dict:
        state = {}
        for name in ("m_t", "v_t"):
            value = getattr(self, name, None)
            if value:
                state[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
        return state

    def load_server_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, {k: v.numpy() for k, v in value.items()})


class FaceFedAvg(SiteAwareMixin, FedAvg):
    pass


class FaceFedProx(SiteAwareMixin, FedProx):
    pass


class FaceFedAdam(SiteAwareMixin, FedAdam):
    pass


class FaceFedMedian(SiteAwareMixin, FedMedian):
    pass


class FaceFedTrimmedAvg(SiteAwareMixin, FedTrimmedAvg):
    pass


def build_strategy(cfg: RunConfig, reference: dict, round_offset: int = 0) -> SiteAwareMixin:
    """The strategy ``cfg.strategy`` names, sampling ``fraction-train`` of the sites, at least ``min-sites``.

    ``aggregator = median | trimmed-mean`` swaps the weighted mean for Flower's coordinate-wise median or trimmed
    mean (robust to a minority of bad updates); with FedProx the sites still add the proximal term."""
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,  # sites report validation metrics with their update; the server evaluates globally
        min_train_nodes=cfg.min_sites,
        min_available_nodes=cfg.min_sites,
        train_metrics_aggr_fn=aggregate_site_metrics,
    )
    if cfg.aggregator == "median":
        strategy: SiteAwareMixin = FaceFedMedian(**common)
    elif cfg.aggregator == "trimmed-mean":
        strategy = FaceFedTrimmedAvg(beta=cfg.trim_fraction, **common)
    elif cfg.strategy == "fedavg":
        strategy = FaceFedAvg(**common)
    elif cfg.strategy == "fedprox":
        strategy = FaceFedProx(proximal_mu=cfg.proximal_mu, **common)
    else:
        strategy = FaceFedAdam(eta=cfg.server_lr, eta_l=cfg.embedding_lr, **common)
    strategy.init_facefl(reference, round_offset, cfg.max_update_norm, cfg.min_sites, cfg.quorum_timeout,
                         cfg.round_timeout)
    return strategy
