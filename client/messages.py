"""Flower messages to and from ``client.site.run_round``: a plain round, a SecAgg+ round, and the site state kept in
Flower's node state. (Imported by the ClientApp's train handler when a round trains.)"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.privacy import PrivacyLedger
from client.secure import received_global, secure_train_reply
from client.site import RoundResult, Site, SiteState, run_round
from common.anonymization.egress import array_signature, check_reply
from common.config import RunConfig

_LEDGER_KEY = "privacy-ledger"
_HEAD_KEY = "margin-head"
_DISC_KEY = "discriminator"
_OPT_KEY = "embedding-optimizer"


def node_state(context: Context) -> SiteState:
    state = context.state
    ledger = None
    if _LEDGER_KEY in state.config_records:
        ledger = PrivacyLedger.from_json(str(state.config_records[_LEDGER_KEY]["json"]))
    head, disc, opt = (state.array_records[key].to_torch_state_dict() if key in state.array_records else None
                       for key in (_HEAD_KEY, _DISC_KEY, _OPT_KEY))
    return SiteState(ledger, head, disc, opt)


def save_node_state(context: Context, site_state: SiteState) -> None:
    if site_state.ledger is not None:
        context.state.config_records[_LEDGER_KEY] = ConfigRecord({"json": site_state.ledger.to_json()})
    if site_state.head is not None:
        context.state.array_records[_HEAD_KEY] = ArrayRecord(site_state.head)
    if site_state.discriminator is not None:
        context.state.array_records[_DISC_KEY] = ArrayRecord(site_state.discriminator)
    if site_state.optimizer is not None:
        context.state.array_records[_OPT_KEY] = ArrayRecord(site_state.optimizer)


def secure_train_round(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round under SecAgg+ (called by Flower's ``secaggplus_mod`` in its masking stage): train as in
    :func:`train_round`, reply with the update for the mod to mask."""
    global_state, config = received_global(msg, cfg)
    site = Site.from_node_config(dict(context.node_config), default_state_root=str(config["state-root"]))
    result: RoundResult = run_round(cfg, site, global_state, int(config["round"]), node_state(context))
    save_node_state(context, result.site_state)
    return secure_train_reply(msg, global_state, result.state, result.metrics,
                              {"site-name": site.name, "message": result.message, "audit-head": result.audit_head},
                              cfg)


def train_round(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train on this site's faces for one round (or decline when the privacy budget would be exceeded)."""
    config = msg.content["config"]
    site = Site.from_node_config(dict(context.node_config), default_state_root=str(config["state-root"]))
    global_arrays: ArrayRecord = msg.content["arrays"]
    result: RoundResult = run_round(cfg, site, global_arrays.to_torch_state_dict(), int(config["round"]),
                                    node_state(context))
    save_node_state(context, result.site_state)
    # A declining site sends back the weights it received (they carry no information about its data);
    # the server drops declined replies before aggregating.
    arrays = global_arrays if result.state is None else ArrayRecord(result.state)
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord(result.metrics),
        "site": ConfigRecord({"name": site.name, "message": result.message, "audit-head": result.audit_head}),
    })
    # Every reply passes the egress check: exactly the model arrays the server sent, and no image that did not
    # come through the anonymization gate.
    check_reply(content, sent_arrays=array_signature(global_arrays))
    return Message(content=content, reply_to=msg)
