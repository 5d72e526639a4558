"""facefl ClientApp: a site. Translates Flower messages to and from ``client.site.run_round``."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy import PrivacyLedger
from client.secure import (
    is_secure,
    received_global,
    requires_secure_aggregation,
    secure_aggregation_mod,
    secure_train_reply,
)
from client.site import RoundResult, Site, SiteState, run_round
from common.config import RunConfig
from common.egress import array_signature, check_reply

log = logging.getLogger("facefl.client")

_LEDGER_KEY = "privacy-ledger"
_HEAD_KEY = "margin-head"
_DISC_KEY = "discriminator"


def _node_state(context: Context) -> SiteState:
    state = context.state
    ledger = None
    if _LEDGER_KEY in state.config_records:
        ledger = PrivacyLedger.from_json(str(state.config_records[_LEDGER_KEY]["json"]))
    head = state.array_records[_HEAD_KEY].to_torch_state_dict() if _HEAD_KEY in state.array_records else None
    disc = state.array_records[_DISC_KEY].to_torch_state_dict() if _DISC_KEY in state.array_records else None
    return SiteState(ledger, head, disc)


def _save_node_state(context: Context, site_state: SiteState) -> None:
    if site_state.ledger is not None:
        context.state.config_records[_LEDGER_KEY] = ConfigRecord({"json": site_state.ledger.to_json()})
    if site_state.head is not None:
        context.state.array_records[_HEAD_KEY] = ArrayRecord(site_state.head)
    if site_state.discriminator is not None:
        context.state.array_records[_DISC_KEY] = ArrayRecord(site_state.discriminator)


def make_client_app(overrides: dict | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp reading the run config from Flower's context, with ``overrides`` on top
    (``facefl simulate`` passes its options this way). ``mods`` run inside the secure-aggregation mod, so they see
    a site's plain reply before it is masked."""
    client_app = ClientApp()

    @client_app.train(mods=[secure_aggregation_mod, *(mods or [])])
    def _train(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})})
        if is_secure(msg):
            return secure_train_round(msg, context, cfg)
        if requires_secure_aggregation(dict(context.node_config)):
            raise PermissionError("This site takes part only in securely aggregated rounds "
                                  "(require-secure-aggregation); start the run with secure-aggregation=true.")
        return train_round(msg, context, cfg)

    return client_app


def secure_train_round(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round under SecAgg+ (called by Flower's ``secaggplus_mod`` in its masking stage): train as in
    :func:`train_round`, reply with the update for the mod to mask."""
    global_state, config = received_global(msg, cfg)
    site = Site.from_node_config(dict(context.node_config), default_state_root=str(config["state-root"]))
    result: RoundResult = run_round(cfg, site, global_state, int(config["round"]), _node_state(context))
    _save_node_state(context, result.site_state)
    return secure_train_reply(msg, global_state, result.state, result.metrics,
                              {"site-name": site.name, "message": result.message, "audit-head": result.audit_head},
                              cfg)


def train_round(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train on this site's faces for one round (or decline when the privacy budget would be exceeded)."""
    config = msg.content["config"]
    site = Site.from_node_config(dict(context.node_config), default_state_root=str(config["state-root"]))
    global_arrays: ArrayRecord = msg.content["arrays"]
    result: RoundResult = run_round(cfg, site, global_arrays.to_torch_state_dict(), int(config["round"]),
                                    _node_state(context))
    _save_node_state(context, result.site_state)
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


app = make_client_app()
