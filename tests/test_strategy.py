"""Server-side aggregation with Flower's strategies: declined, failed and malformed replies are left out."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.models.federated import build_models
from server.strategy import aggregate_site_metrics, build_strategy


def _reply(node: int, name: str, state: dict, *, declined: bool = False, n: float = 100.0) -> Message:
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    metrics = {"num-examples": n, "declined": float(declined), "epsilon": float(node), "train-loss": 1.0 + node}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": name, "message": "budget spent" if declined else ""})})
    return Message(content, reply_to=instruction)


@pytest.fixture(autouse=True, scope="module")
def _run_identity():
    """Messages are stamped with the run they belong to; outside a running Flower process, name one."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


@pytest.fixture(scope="module")
def reference():
    return build_models(RunConfig(task="embedding", dp=False)).state_dict()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_declined_and_hostile_updates_are_left_out(name, reference):
    cfg = RunConfig(task="embedding", dp=False, strategy=name)
    strategy = build_strategy(cfg, reference, round_offset=4)
    if name == "fedadam":  # FedOpt remembers the arrays it sent in configure_train
        strategy.current_arrays = {k: v.numpy() for k, v in reference.items()}
    plus = lambda c: {k: v + c if v.is_floating_point() else v for k, v in reference.items()}  # noqa: E731
    nan = plus(0.0)
    nan[next(iter(nan))] = nan[next(iter(nan))] * float("nan")
    wrong_shape = plus(0.0)
    key = next(iter(wrong_shape))
    wrong_shape[key] = wrong_shape[key][:1]
    replies = [_reply(1, "a", plus(1.0)), _reply(2, "b", plus(3.0)), _reply(3, "c", plus(100.0), declined=True),
               _reply(4, "d", nan), _reply(5, "e", wrong_shape)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.reports[5]  # absolute round = offset + round
    assert set(report.declined) == {"c"} and set(report.rejected) == {"d", "e"}
    assert set(report.sites) == {"a", "b", "c", "d", "e"}
    assert metrics["num-sites"] == 2 and metrics["epsilon"] == 2.0  # max over the sites that were used
    out = arrays.to_torch_state_dict()
    if name in ("fedavg", "fedprox"):
        for k, v in reference.items():
            if v.is_floating_point():
                torch.testing.assert_close(out[k], v + 2.0)
    else:  # FedAdam takes a server step towards the average
        k = next(k for k, v in reference.items() if v.is_floating_point())
        assert torch.all(out[k] > reference[k])


def test_a_round_where_every_site_declines_keeps_the_model(reference):
    strategy = build_strategy(RunConfig(task="embedding", dp=False), reference)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "a", reference, declined=True)])
    assert arrays is None and metrics is None and set(strategy.reports[1].declined) == {"a"}


def test_site_metrics_are_weighted_and_epsilon_is_a_maximum():
    records = [RecordDict({"m": MetricRecord({"num-examples": 1.0, "train-loss": 1.0, "epsilon": 5.0})}),
               RecordDict({"m": MetricRecord({"num-examples": 3.0, "train-loss": 3.0, "epsilon": 2.0})})]
    out = aggregate_site_metrics(records, "num-examples")
    assert out["train-loss"] == pytest.approx(2.5) and out["epsilon"] == 5.0 and out["num-examples"] == 4.0


def _shifted(reference: dict, c: float) -> dict:
    return {k: v + c if v.is_floating_point() else v for k, v in reference.items()}


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregators_ignore_one_poisoned_site(aggregator, reference):
    """Four honest sites and one that sends a huge (finite) update: the mean follows the attacker, the median and
    trimmed mean stay with the honest sites."""
    cfg = RunConfig(task="embedding", dp=False, aggregator=aggregator, trim_fraction=0.2, min_sites=2)
    strategy = build_strategy(cfg, reference)
    def replies():
        honest = [_reply(i + 1, f"s{i}", _shifted(reference, c)) for i, c in enumerate((1.0, 2.0, 3.0, 4.0))]
        return honest + [_reply(9, "attacker", _shifted(reference, 1e6))]

    arrays, _ = strategy.aggregate_train(1, replies())
    out = arrays.to_torch_state_dict()
    k = next(k for k, v in reference.items() if v.is_floating_point())
    shift = (out[k] - reference[k]).abs().max().item()
    assert shift <= 4.0 + 1e-3, shift
    mean, _ = build_strategy(RunConfig(task="embedding", dp=False), reference).aggregate_train(1, replies())
    assert (mean.to_torch_state_dict()[k] - reference[k]).abs().max().item() > 1e5


def test_updates_above_the_norm_bound_are_rejected(reference):
    cfg = RunConfig(task="embedding", dp=False, max_update_norm=50.0)
    strategy = build_strategy(cfg, reference)
    small, big = _shifted(reference, 1e-3), _shifted(reference, 10.0)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "a", small), _reply(2, "b", big)])
    report = strategy.reports[1]
    assert set(report.rejected) == {"b"} and "max-update-norm" in report.rejected["b"]
    assert metrics["num-sites"] == 1
    k = next(k for k, v in reference.items() if v.is_floating_point())
    torch.testing.assert_close(arrays.to_torch_state_dict()[k], small[k])


def test_robust_aggregator_cannot_be_combined_with_fedadam():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="fedadam"):
        RunConfig(strategy="fedadam", aggregator="median")
    with pytest.raises(ConfigError, match="trim-fraction"):
        RunConfig(aggregator="trimmed-mean", trim_fraction=0.5)


class _Grid:
    """The transport, faked: which nodes are connected at each call."""

    def __init__(self, *connected: list[int]) -> None:
        self.connected = list(connected)

    def get_node_ids(self):
        return self.connected.pop(0) if len(self.connected) > 1 else self.connected[0]


def test_quorum_is_awaited_then_the_run_ends_with_a_clear_message():
    import time

    from server.strategy import QuorumError, wait_for_quorum

    assert wait_for_quorum(_Grid([1], [1, 2], [1, 2, 3]), 3, 5.0, poll=0.01) == [1, 2, 3]
    start = time.monotonic()
    with pytest.raises(QuorumError, match="Only 1 of the required 3 sites"):
        wait_for_quorum(_Grid([7]), 3, 0.3, poll=0.05)
    assert 0.25 < time.monotonic() - start < 2.0  # bounded: never a hang


class _NodesGrid:
    """The part of Flower's Grid a strategy's configure_train uses: the connected nodes (a transport stand-in)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_a_site_that_stopped_heartbeating_is_named_in_the_round_report(reference):
    """When a site vanishes mid-round, the SuperLink itself answers for it ("Node Unavailable", sent from node 1):
    the report names the site's node, found through the message the error replies to, not node 1."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy = build_strategy(RunConfig(task="embedding", dp=False, min_sites=2), reference)
    sent = list(strategy.configure_train(1, ArrayRecord(reference), ConfigRecord(), _NodesGrid([7, 8])))
    for msg in sent:  # what the grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    lost = next(m for m in sent if m.metadata.dst_node_id == 8)
    error = create_message_error_unavailable_res_message(lost.metadata, "node_unavail")
    assert error.metadata.src_node_id == 1 and error.has_error()
    arrays, _ = strategy.aggregate_train(1, [_reply(7, "a", _shifted(reference, 1.0)), error])
    report = strategy.reports[1]
    assert set(report.failed) == {"node-8"} and "Node Unavailable" in report.failed["node-8"]
    assert set(report.sites) == {"a"} and arrays is not None
