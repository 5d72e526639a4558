"""Secure aggregation (Flower's SecAgg+): real sites (real LFW faces, real DP-SGD training, Flower's secaggplus_mod)
and the real server loop (run_federation with Flower's SecAggPlusWorkflow); only the transport is in-process."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from inprocess_grid import InProcessGrid

from client.app import make_client_app
from client.privacy import PrivacyLedger
from common.audit import verify_log
from common.config import ConfigError, RunConfig
from common.models.federated import build_models
from common.secagg import WEIGHT_METRIC, error_bound, quantization_range
from server.federation import run_federation

NODES = (101, 202, 303)


def _config(lfw_root, cache_dir, tmp_path, **changes) -> RunConfig:
    return RunConfig.from_mapping({
        # The guard scores the update on 8 validation people but keeps it: the update is checked exactly below.
        "task": "embedding", "model": "compact", "validation-people": 8, "reject-worse-rounds": False,
        "data": str(lfw_root), "num-rounds": 1, "min-sites": 2, "dp": True,
        "target-epsilon": 50, "accountant": "rdp", "batch-size": 16, "max-identities": 18, "eval-pairs": 40,
        "eval-faces": 8, "cache-dir": str(cache_dir), "run-dir": str(tmp_path / "run"),
        "secure-aggregation": True, "secagg-timeout": 30, "round-timeout": 120, **changes})


class _Recorder:
    """A client mod placed inside the secure-aggregation mod: it sees each site's plain reply before masking."""

    def __init__(self) -> None:
        self.updates: dict[int, tuple[list[np.ndarray], int]] = {}

    def __call__(self, msg: Message, ctxt, call_next) -> Message:
        reply = call_next(msg, ctxt)
        if "fitres.parameters" not in reply.content.array_records:
            return reply
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        self.updates[msg.metadata.dst_node_id] = ([a.copy() for a in parameters_to_ndarrays(fitres.parameters)],
                                                  fitres.num_examples)
        return reply


def _federation(cfg: RunConfig, drop=None, node_configs=None):
    recorder = _Recorder()
    configs = node_configs or {nid: {"partition-id": i, "num-partitions": len(NODES)} for i, nid in enumerate(NODES)}
    grid = InProcessGrid(make_client_app(mods=[recorder]), configs, cfg.to_mapping(), drop=drop)
    run = run_federation(grid, cfg)
    return run, grid, recorder


def _received_at(grid: InProcessGrid, stage: str) -> dict[int, Message]:
    return {msg.metadata.dst_node_id: reply for msg, reply in grid.exchanges
            if reply is not None and not reply.has_error()
            and msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == stage}


@pytest.mark.slow
def test_the_server_receives_masked_updates_and_unmasks_only_their_weighted_mean(lfw_root, cache_dir, tmp_path):
    cfg = _config(lfw_root, cache_dir, tmp_path)
    initial = build_models(cfg).state_dict()
    run, grid, recorder = _federation(cfg)

    # Every site trained, and what it would have sent in the clear is a real, non-zero update.
    assert set(recorder.updates) == set(NODES)
    received = _received_at(grid, Stage.COLLECT_MASKED_VECTORS)
    assert set(received) == set(NODES)
    q = quantization_range(len(NODES))
    clip = cfg.secagg_clip_range
    for nid, reply in received.items():
        update, weight = recorder.updates[nid]
        assert weight > 0 and max(float(np.abs(u).max()) for u in update) > 1e-4
        # No plain array leaves the site: the array records are empty; the masked vector is in the config record.
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert len(masked) == len(update) + 1  # the weight comes first
        # Read as if it were the quantised update, the masked vector is unrelated to the update: uniform noise.
        flat_update = np.concatenate([u.ravel() for u in update]) * weight / cfg.secagg_max_examples
        flat_masked = np.concatenate([m.ravel() for m in masked[1:]]).astype(np.float64)
        decoded = (flat_masked % q) * (2 * clip / q) - clip
        assert abs(np.corrcoef(decoded, flat_update)[0, 1]) < 0.02
        assert np.mean(np.abs(decoded - flat_update)) > clip / 4
        assert int(masked[0][0]) != int(round(weight / cfg.secagg_max_examples * q))  # the weight is masked too

    # The server's new global model is the example-weighted mean of the plain updates, within the bound.
    after = torch.load(run / "checkpoints" / "round-0001.pt", weights_only=True)["state_dict"]
    weights = {nid: recorder.updates[nid][1] for nid in NODES}
    total = sum(weights.values())
    bound = error_bound(len(NODES), clip, cfg.secagg_max_examples, total)
    assert bound < 1e-5
    worst = 0.0
    for i, key in enumerate(initial):
        exact = sum(recorder.updates[nid][0][i].astype(np.float64) * weights[nid] for nid in NODES) / total
        got = (after[key].double() - initial[key].double()).numpy()
        worst = max(worst, float(np.abs(got - exact).max()))
    assert worst <= bound + 2e-7, (worst, bound)  # (+ float32 rounding of the stored weights)

    # The rest of the round is as without secure aggregation: metrics, privacy ledgers, audit anchoring.
    metrics = json.loads((run / "metrics.json").read_text())
    last = metrics["rounds"][-1]
    assert last["round"] == 1 and set(last["sites"]) == {f"site-{i}" for i in range(3)}
    assert last["guard"]["kept"] and 0.0 <= last["guard"]["validation_auc"] <= 1.0  # scored on validation people
    assert all(s["secagg-clipped"] == 0.0 and s[WEIGHT_METRIC] > 0 for s in last["sites"].values())
    for i in range(3):
        ledger = PrivacyLedger.load(run / "sites" / f"site-{i}")
        assert 0 < ledger.spent <= 50 + 1e-6
    entries = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    assert entries[0]["data"]["aggregation"]["secure_aggregation"] is True
    assert verify_log(run / "audit.jsonl").ok
    # Bounded waits: key exchange and unmasking with secagg-timeout, training with round-timeout.
    assert grid.timeouts == [cfg.secagg_timeout, cfg.secagg_timeout, cfg.round_timeout, cfg.secagg_timeout]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS])
def test_a_site_dropping_out_mid_protocol_does_not_stall_or_spoil_the_round(lfw_root, cache_dir, tmp_path, stage):
    """Node 303 vanishes after sending its public keys (before its key shares went out: Flower alone fails the
    round then), or after the key exchange, before training (its pairwise masks are then rebuilt from the others'
    shares). Either way the round's update is the weighted mean of the two sites that finished."""
    cfg = _config(lfw_root, cache_dir, tmp_path, **{"max-identities": 12})
    initial = build_models(cfg).state_dict()

    def drop(node: int, msg: Message) -> bool:
        return node == 303 and msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == stage

    run, grid, recorder = _federation(cfg, drop=drop)
    assert set(recorder.updates) == {101, 202}
    after = torch.load(run / "checkpoints" / "round-0001.pt", weights_only=True)["state_dict"]
    total = sum(recorder.updates[n][1] for n in (101, 202))
    bound = error_bound(2, cfg.secagg_clip_range, cfg.secagg_max_examples, total)
    for i, key in enumerate(initial):
        exact = sum(recorder.updates[n][0][i].astype(np.float64) * recorder.updates[n][1] for n in (101, 202)) / total
        assert np.abs((after[key].double() - initial[key].double()).numpy() - exact).max() <= bound + 2e-7, key
    last = json.loads((run / "metrics.json").read_text())["rounds"][-1]
    assert set(last["sites"]) == {"site-0", "site-1"} and "node-303" in last["failed"]


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_round(lfw_root, cache_dir, tmp_path):
    cfg = _config(lfw_root, cache_dir, tmp_path, **{"secure-aggregation": False, "max-identities": 12,
                                                    "min-sites": 1})
    configs = {nid: {"partition-id": i, "num-partitions": 3, "require-secure-aggregation": i == 2}
               for i, nid in enumerate(NODES)}
    run, grid, recorder = _federation(cfg, node_configs=configs)
    last = json.loads((run / "metrics.json").read_text())["rounds"][-1]
    assert set(last["sites"]) == {"site-0", "site-1"}
    assert "only in securely aggregated rounds" in last["failed"]["node-303"]
    assert not recorder.updates  # nothing went through the secure path


def test_secure_aggregation_refuses_what_needs_individual_updates():
    for changes in ({"aggregator": "median"}, {"max-update-norm": 5.0}, {"strategy": "fedadam"}, {"min-sites": 1}):
        with pytest.raises(ConfigError, match="secure-aggregation=true cannot be combined"):
            RunConfig.from_mapping({"secure-aggregation": True, **changes})
    with pytest.raises(ConfigError, match="secagg-threshold"):
        RunConfig.from_mapping({"secure-aggregation": True, "secagg-threshold": 0})


def test_masks_come_from_the_whole_seed_not_a_32_bit_fold():
    """Flower's pseudo_rand_gen XOR-folds a 32-byte seed to 32 bits: seeds that fold alike give the same mask.
    facefl's mask_stream (installed on both ends) keys ChaCha20 with the whole seed."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from common.secagg import MODULUS, mask_stream

    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert sys.modules[module].pseudo_rand_gen is mask_stream
    seed = bytes(range(32))
    twin = bytes([b ^ 0x5A for b in seed[:8]]) + seed[8:]  # the two XORs cancel in Flower's 32-bit fold
    dims = [(1,), (64, 3, 3), ()]
    assert all(np.array_equal(a, b) for a, b in zip(pseudo_rand_gen(seed, MODULUS, dims),
                                                     pseudo_rand_gen(twin, MODULUS, dims)))
    ours, ours_twin = mask_stream(seed, MODULUS, dims), mask_stream(twin, MODULUS, dims)
    assert [m.shape for m in ours] == [(1,), (64, 3, 3), ()] and all(m.dtype == np.int64 for m in ours)
    assert not np.array_equal(ours[1], ours_twin[1])
    assert all(np.array_equal(a, b) for a, b in zip(ours, mask_stream(seed, MODULUS, dims)))  # deterministic
    big = mask_stream(seed, MODULUS, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < MODULUS
    assert abs(big.mean() / MODULUS - 0.5) < 0.005 and abs((big & 1).mean() - 0.5) < 0.005  # uniform-looking
